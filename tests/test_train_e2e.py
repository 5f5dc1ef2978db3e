"""train.py end to end, as a user runs it: a stopped and resumed run equals an unbroken one."""

import json
import glob
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=' + os.path.join(REPO, 'configs', 'default.py') + ':tiny']


def run_train(workdir, *args, env=None, cwd=REPO):
  """train.py on the tiny default config, unless `args` name another --config; run in `cwd`."""
  config = [] if any(a.startswith('--config=') for a in args) else TINY
  return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={workdir}',
                         *config, *args], capture_output=True, text=True, cwd=cwd,
                        timeout=600, check=False, env={**os.environ, **(env or {})})


def saved_state(workdir, step):
  """The train state saved at `step`, on one local device whatever the run's layout was."""
  return read_item(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def read_item(path):
  """The arrays Orbax saved in `path` (a checkpoint item), on one local device."""
  checkpointer = ocp.StandardCheckpointer()
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one_device),
                        checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target)


def tensorboard_scalars(workdir, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard shows them, in the order written: event files read
  in name order, and a session START at step s purging every point at step >= s before it
  (what TensorBoard does with a writer's `purge_step`)."""
  points = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    for event in _events(path):
      if event.session_log.status == event_pb2.SessionLog.START:
        points = [(s, v) for s, v in points if s < event.step]
      points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return points


def _events(path):
  """The Event protos of one TFRecord file (length, its CRC, the record, its CRC)."""
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    offset += 12
    yield event_pb2.Event.FromString(data[offset:offset + length])
    offset += length + 4


def _losses(workdir):
  return [(r['step'], r['train/loss'], r.get('eval/loss')) for r in metrics.read_metrics(workdir)]


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('unbroken')
  result = run_train(workdir)
  assert result.returncode == 0, result.stderr
  return workdir, result


def test_run_writes_outputs(unbroken):
  workdir, result = unbroken
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']
  assert os.listdir(workdir / 'tensorboard')
  assert (workdir / 'config.json').exists()
  # JAX_COMPILATION_CACHE_DIR (conftest.py's cache, shared by every run) wins over the workdir's
  assert os.listdir(os.environ['JAX_COMPILATION_CACHE_DIR'])
  assert not (workdir / 'compile_cache').exists()
  records = metrics.read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 9))
  for key in ('train/loss', 'learning_rate', 'tokens_per_second'):
    assert all(np.isfinite(r[key]) for r in records)
  for r in records:  # 8 devices share the tokens; MFU is against the measured matmul rate
    assert r['perf/tokens_per_second_per_device'] == pytest.approx(r['tokens_per_second'] / 8)
    assert 0 < r['perf/mfu'] < 1 and r['perf/model_tflops_per_device'] > 0
  assert [r['step'] for r in records if 'eval/loss' in r] == [4, 8]
  assert not any(k.startswith('health/') for r in records for k in r)  # health.every=0: off
  assert '--- sample ---' in result.stdout
  assert tensorboard_scalars(workdir, 'train/loss') == [
      (r['step'], pytest.approx(r['train/loss'])) for r in records]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['complete'] and summary['last']['train/loss'] == records[-1]['train/loss']
  assert summary['best']['eval/loss']['step'] in (4, 8)
  assert (workdir / 'report.png').stat().st_size > 0


def test_stopped_and_resumed_run_matches_unbroken_run_bit_for_bit(unbroken, tmp_path):
  """The resumed run loads its train step from the compile cache: same results, bit for bit."""
  workdir, _ = unbroken
  first = run_train(tmp_path, '--config.train.stop_after=4')
  assert first.returncode == 0, first.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  second = run_train(tmp_path, env={'JAX_LOG_COMPILES': '1'})  # logs cache hits by name
  assert second.returncode == 0, second.stderr
  assert 'Resumed from the checkpoint at step 4' in second.stdout
  assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
  assert _losses(tmp_path) == _losses(workdir)
  resumed, reference = saved_state(tmp_path, 8), saved_state(workdir, 8)
  assert jax.tree.structure(resumed) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)  # params and optimizer state, bit for bit


def test_finished_run_reports_complete(unbroken):
  workdir, _ = unbroken
  again = run_train(workdir)
  assert again.returncode == 0, again.stderr
  assert 'already complete' in again.stdout
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']


def test_compile_cache_can_be_turned_off(tmp_path):
  result = run_train(tmp_path, '--config.train.stop_after=1', '--compile_cache=none')
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / 'compile_cache').exists()
