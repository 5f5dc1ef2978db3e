"""Two processes on this machine (4 CPU devices each, collectives over gloo) as one run."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_faults import _assert_same_state, _losses, _state, _wait_for_step
from tests.test_train_e2e import REPO, TINY, run_train
from training import exit_codes

# FSDP x tensor over both processes, so parameters and checkpoints are split between them.
# Two data streams: one per process here, both in the one-process run.
SHARED = ['--config.data.num_streams=2', '--config.mesh.data=1', '--config.mesh.fsdp=4',
          '--config.mesh.tensor=2', '--config.task.num_samples=0', '--config.train.steps=12',
          '--config.model.dropout_rate=0.1']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, *args, num_processes=2):
  """Starts the processes of one run; each sees 4 CPU devices."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  address = f'127.0.0.1:{_free_port()}'
  return [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={workdir}', *TINY, *SHARED,
       *args, f'--coordinator_address={address}', f'--num_processes={num_processes}',
       f'--process_id={i}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      cwd=REPO, env=env) for i in range(num_processes)]


def _finish(processes, timeout=600, status=exit_codes.DONE):
  outputs = [p.communicate(timeout=timeout) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == status, err[-3000:]
  return outputs


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_processes')
  _finish(_start(workdir))
  return workdir


def test_two_processes_match_one_process_over_the_same_devices(two_process_run, tmp_path):
  result = run_train(tmp_path, *SHARED)  # 8 devices in one process (tests/conftest.py)
  assert result.returncode == 0, result.stderr
  two, one = _losses(two_process_run), _losses(tmp_path)
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 13))
  # Gloo sums across processes in another order than one process does: float32 rounding only.
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-6)
  _assert_same_up_to_rounding(_state(two_process_run, 12), _state(tmp_path, 12))


def _assert_same_up_to_rounding(a, b):
  """Train states `a` and `b` differ by float32 rounding only, array by array.

  Rounding leaves each array within ~5e-7 of its largest value; 1e-4 of it is allowed. An array
  with no training signal holds only noise, though: softmax ignores the key bias (it adds q.b to
  every score alike), so its exact gradient is zero, and Adam, whose steps do not shrink with the
  gradient, turns rounding into values ~1e-6 that differ between runs by their own size. So each
  array also gets a floor of 1e-5 of the largest value of its kind (the parameters, or one
  optimizer moment). Other training (another data order, other dropout) moves parameters apart
  by about the learning rate (3e-3) a step: thousands of times this bound.
  """
  param_paths = {jax.tree_util.keystr(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(a['params'])}

  def kind(path):  # ('opt_state', 1, 0, 'mu') for the first moment of any parameter
    return next((path[:i] for i in range(len(path))
                 if jax.tree_util.keystr(path[i:]) in param_paths), path)

  leaves = [(jax.tree_util.keystr(path), kind(path), np.asarray(x), np.asarray(y))
            for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))]
  kind_scale = {}
  for _, k, _, y in leaves:
    kind_scale[k] = max(kind_scale.get(k, 0.0), float(np.abs(y).max(initial=0)))
  for name, k, x, y in leaves:
    difference = float(np.abs(x.astype(np.float64) - y).max(initial=0))
    bound = 1e-4 * float(np.abs(y).max(initial=0)) + 1e-5 * kind_scale[k]
    assert difference <= bound, f'{name}: differs by {difference:.3g} > {bound:.3g}'


def test_two_processes_killed_then_resumed_match_the_unbroken_run(two_process_run, tmp_path):
  """SIGKILL to both (a host lost, the job rescheduled), twice, mid-run and mid-save."""
  for kill_at in (3, 7):
    processes = _start(tmp_path, '--config.train.checkpoint_every=2')
    _wait_for_step(tmp_path, kill_at, processes[0])
    for p in processes:
      p.kill()
      p.communicate()
  _finish(_start(tmp_path, '--config.train.checkpoint_every=2'))
  assert _losses(tmp_path) == _losses(two_process_run)
  _assert_same_state(_state(tmp_path, 12), _state(two_process_run, 12))


def test_resumed_on_another_number_of_processes_the_run_goes_on_unchanged(two_process_run,
                                                                        tmp_path):
  """The slice recreated smaller, then larger: 2 processes (8 devices), then 1 (4 devices, so
  FSDP over 2), then 2 again. Each data stream's position passes to whichever process owns it
  now, so the batches go on exactly; only the order of the sums differs from the unbroken run
  (float32 rounding)."""
  _finish(_start(tmp_path, '--config.train.stop_after=4'))
  result = run_train(tmp_path, *SHARED, '--config.mesh.fsdp=2', '--config.train.stop_after=8',
                     env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert result.returncode == 0, result.stderr
  _finish(_start(tmp_path))
  resumed, unbroken = _losses(tmp_path), _losses(two_process_run)
  assert [s for s, _ in resumed] == list(range(1, 13))
  np.testing.assert_allclose([l for _, l in resumed], [l for _, l in unbroken], rtol=2e-6)
  _assert_same_up_to_rounding(_state(tmp_path, 12), _state(two_process_run, 12))


def test_resuming_on_processes_that_read_other_streams_is_a_one_line_error(tmp_path):
  """data.num_streams=0 is one stream per process: one process wrote the checkpoint, two would
  read two streams, which would change the batches. Refused, and the checkpoint left alone."""
  result = run_train(tmp_path, *SHARED, '--config.data.num_streams=0',
                     '--config.train.stop_after=2')
  assert result.returncode == 0, result.stderr
  processes = _start(tmp_path, '--config.data.num_streams=0')
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f'train.py: error: data.num_streams: the checkpoint in {tmp_path}/checkpoints/2 read the '
        'data in 1 stream(s) and this run would read 2 (0 means one per process); resume with '
        '--config.data.num_streams=1, on a number of processes that divides 1')
  assert os.listdir(tmp_path / 'checkpoints') == ['2']


def test_sigterm_to_every_process_saves_one_agreed_step(two_process_run, tmp_path):
  processes = _start(tmp_path, '--config.train.checkpoint_every=1000')
  _wait_for_step(tmp_path, 3, processes[0])
  signalled = time.time()
  for p in processes:
    p.send_signal(signal.SIGTERM)
  outputs = _finish(processes, timeout=120, status=exit_codes.PREEMPTED)
  assert time.time() - signalled < 60
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints')]
  assert len(saved) == 1 and 3 <= saved[0] < 12
  assert f'received: saved step {saved[0]}' in ''.join(outputs[0])
  _finish(_start(tmp_path))
  assert _losses(tmp_path) == _losses(two_process_run)
  _assert_same_state(_state(tmp_path, 12), _state(two_process_run, 12))
