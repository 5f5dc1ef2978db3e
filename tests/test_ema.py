"""EMA of the parameters (train.ema_decay): the average a user evaluates and exports, kept
exactly across a resume, and nothing at all when off."""

import os

import jax
import numpy as np
import pytest

from configs import default
from parallel import sharding
from tests.test_train_e2e import read_item, run_train, saved_state
from training import config_check, metrics, warm_start
from training import state as state_lib

DECAY = 0.5  # large, so that every step's parameters weigh in visibly
ARGS = ('--config.train.steps=4', '--config.train.eval_every=2',
        '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=4',
        '--config.task.num_samples=0')


def _average(workdir, step):
  """The average saved with the checkpoint of `step`, on one device."""
  return read_item(os.path.join(workdir, 'checkpoints', str(step), 'parts'))['ema']


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module', name='unbroken')
def fixture_unbroken(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ema')
  result = run_train(workdir, *ARGS, f'--config.train.ema_decay={DECAY}')
  assert result.returncode == 0, result.stderr
  return workdir


def test_average_matches_a_hand_computation_and_is_evaluated_and_exported(unbroken):
  config = default.get_config('tiny')
  config.train.steps = 4
  setup = state_lib.make_setup(config, sharding.make_mesh(config.mesh))
  # Leaves in the same order: a fresh tree's layer keys are ints, a restored one's strings.
  expected = jax.tree.leaves(jax.device_get(state_lib.init_state(config, setup)['params']))
  for step in range(1, 5):
    params = jax.tree.leaves(saved_state(unbroken, step)['params'])
    expected = [DECAY * a + (1 - DECAY) * p for a, p in zip(expected, params)]
    average = _average(unbroken, step)
    for x, y in zip(jax.tree.leaves(average), expected, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  records = {r['step']: r for r in metrics.read_metrics(unbroken)}
  assert [s for s, r in records.items() if 'eval_ema/loss' in r] == [2, 4]
  assert records[4]['eval_ema/loss'] != records[4]['eval/loss']  # other parameters
  # Exported as a run of its own, where init_from, training.sample and training.hf look.
  assert (unbroken / 'ema' / 'config.json').read_text() == (unbroken / 'config.json').read_text()
  assert warm_start.state_dir(str(unbroken / 'ema')) == unbroken / 'ema' / 'state'
  _assert_equal(read_item(unbroken / 'ema' / 'state')['params'], average)


def test_stopped_and_resumed_run_keeps_the_average_bit_for_bit(unbroken, tmp_path):
  args = (*ARGS, f'--config.train.ema_decay={DECAY}')
  assert run_train(tmp_path, *args, '--config.train.stop_after=2').returncode == 0
  second = run_train(tmp_path, *args)
  assert second.returncode == 0, second.stderr
  assert 'Resumed from the checkpoint at step 2' in second.stdout
  _assert_equal(_average(tmp_path, 4), _average(unbroken, 4))
  _assert_equal(saved_state(tmp_path, 4), saved_state(unbroken, 4))
  ema = lambda w: [(r['step'], r.get('eval_ema/loss')) for r in metrics.read_metrics(w)]
  assert ema(tmp_path) == ema(unbroken)


def test_off_trains_the_same_and_keeps_no_average(unbroken, tmp_path):
  result = run_train(tmp_path, *ARGS)  # train.ema_decay=0, the default
  assert result.returncode == 0, result.stderr
  losses = lambda w: [(r['step'], r['train/loss'], r.get('eval/loss'))
                      for r in metrics.read_metrics(w)]
  assert losses(tmp_path) == losses(unbroken)  # the average never feeds back into training
  assert not os.path.exists(tmp_path / 'checkpoints' / '4' / 'parts')
  assert not os.path.exists(tmp_path / 'ema')
  assert not any(k.startswith('eval_ema/') for r in metrics.read_metrics(tmp_path) for k in r)


@pytest.mark.parametrize('decay', [-0.1, 1.0])
def test_a_decay_outside_0_1_is_a_one_line_error(decay):
  config = default.get_config('tiny')
  config.train.ema_decay = decay
  with pytest.raises(config_check.ConfigError, match=r'^train.ema_decay: must be in \[0, 1\)'):
    config_check.validate(config, num_devices=8, num_processes=1)
