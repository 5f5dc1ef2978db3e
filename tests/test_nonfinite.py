"""Non-finite losses and loss spikes: the skip, rollback and stop policies, end to end."""

import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_faults import _assert_same_state, _state
from tests.test_train_e2e import run_train, tensorboard_scalars
from training import metrics
from training import step as step_lib

NAN_AT_5 = ['--config.train.debug_nan_at_step=5', '--config.task.num_samples=0']


def _records(workdir):
  return {r['step']: r for r in metrics.read_metrics(workdir)}


def test_skip_leaves_parameters_and_optimizer_untouched(tmp_path):
  result = run_train(tmp_path, *NAN_AT_5, '--config.train.checkpoint_every=1',
                     '--config.train.stop_after=5')
  assert result.returncode == 0, result.stderr
  assert 'step 5: nonfinite_loss, nonfinite_grads; update skipped' in result.stdout + result.stderr
  records = _records(tmp_path)
  assert records[5]['train/skipped_steps'] == 1 and records[5]['guard/nonfinite_loss'] == 1
  assert records[4]['train/skipped_steps'] == 0
  before, after = _state(tmp_path, 4), _state(tmp_path, 5)
  for key in ('params', 'opt_state', 'loss_stats'):
    _assert_same_state(before[key], after[key])
  assert int(after['step']) == 5 and int(after['skipped_steps']) == 1


def test_stop_names_the_step_and_saves(tmp_path):
  result = run_train(tmp_path, *NAN_AT_5, '--config.train.nonfinite_policy=stop')
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith('train.py: error:')]
  assert len(errors) == 1
  assert 'step 5: nonfinite_loss, nonfinite_grads' in errors[0]
  assert 'nonfinite_policy=stop' in errors[0]
  assert '6' in {p.name for p in (tmp_path / 'checkpoints').iterdir()}


def test_rollback_restores_the_last_checkpoint_and_skips_the_bad_batches(tmp_path):
  unbroken = tmp_path / 'unbroken'
  assert run_train(unbroken, '--config.task.num_samples=0').returncode == 0
  workdir = tmp_path / 'rollback'
  result = run_train(workdir, *NAN_AT_5, '--config.train.nonfinite_policy=rollback',
                     '--config.train.checkpoint_every=2')
  assert result.returncode == 0, result.stderr
  assert 'rolled back to step 4' in result.stdout + result.stderr
  # The injected fault follows the step, not the data, so step 5 fails again: it is skipped.
  assert (result.stdout + result.stderr).count('step 5: nonfinite_loss') == 2
  records, reference = _records(workdir), _records(unbroken)
  assert sorted(records) == list(range(1, 9))  # one history, no duplicated steps
  assert tensorboard_scalars(workdir, 'train/loss') == [  # in TensorBoard too
      (s, pytest.approx(records[s]['train/loss'], nan_ok=True)) for s in sorted(records)]
  assert all(records[s]['train/loss'] == reference[s]['train/loss'] for s in range(1, 5))
  # Steps 6.. resume from step 4's state but on the batches after the offending ones.
  assert records[6]['train/loss'] != reference[6]['train/loss']
  assert all(np.isfinite(records[s]['train/loss']) for s in records if s != 5)


def test_guard_rejects_non_finite_values_and_spikes():
  train = ml_collections.ConfigDict({'spike_sigmas': 3.0, 'spike_window': 10})
  stats = {'mean': jnp.float32(2.0), 'var': jnp.float32(0.01), 'count': jnp.int32(10)}
  finite = jnp.float32(1.0)
  assert bool(step_lib._guard(train, stats, jnp.float32(2.2), finite)['accept'])
  assert bool(step_lib._guard(train, stats, jnp.float32(2.5), finite)['loss_spike'])
  assert not bool(step_lib._guard(train, stats, jnp.float32(np.nan), finite)['accept'])
  assert not bool(step_lib._guard(train, stats, jnp.float32(2.0), jnp.float32(np.inf))['accept'])
  warming_up = {**stats, 'count': jnp.int32(3)}
  assert bool(step_lib._guard(train, warming_up, jnp.float32(2.5), finite)['accept'])


def _corpus(directory, good, bad):
  directory.mkdir()
  for i in range(good):
    (directory / f'good{i:03d}.txt').write_text(f'record {i} is fine')
  for i in range(bad):
    (directory / f'bad{i:03d}.txt').write_bytes(b'\xff\xfe broken ' + bytes([i % 250]))
  return ['--config.data.source=files', f'--config.data.files={directory}/*.txt',
          '--config.data.validation_percent=5', '--config.task.num_samples=0']


def test_a_few_bad_records_are_skipped_and_reported(tmp_path):
  result = run_train(tmp_path / 'run', *_corpus(tmp_path / 'corpus', good=400, bad=2))
  assert result.returncode == 0, result.stderr
  assert 'invalid UTF-8 at byte 0' in result.stdout + result.stderr
  last = metrics.read_metrics(tmp_path / 'run')[-1]
  assert last['data/bad_records'] >= 1 and last['data/bad_fraction'] < 0.01


def test_too_many_bad_records_stop_the_run(tmp_path):
  result = run_train(tmp_path / 'run', *_corpus(tmp_path / 'corpus', good=200, bad=200))
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith('train.py: error: data:')]
  assert len(errors) == 1 and 'data.max_bad_fraction=0.01' in errors[0]
