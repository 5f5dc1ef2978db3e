"""Never lose work: preemption signals and unreadable checkpoints, with real processes."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_train_e2e import REPO, TINY, run_train, tensorboard_scalars
from tests.test_train_e2e import saved_state as _state
from training import exit_codes, metrics

# Dropout on, so its random stream must resume exactly too.
LONG = ['--config.train.steps=40', '--config.train.checkpoint_every=1000',
        '--config.train.eval_every=0', '--config.task.num_samples=0',
        '--config.model.dropout_rate=0.1']


def _assert_same_state(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _losses(workdir):
  return [(r['step'], r['train/loss']) for r in metrics.read_metrics(workdir)]


def _last_step(workdir):
  return max((r['step'] for r in metrics.read_metrics(workdir)), default=0)


def _wait_for_step(workdir, step, process, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if any(r['step'] >= step for r in metrics.read_metrics(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f'run did not reach step {step}')


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('unbroken_long')
  result = run_train(workdir, *LONG)
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_resume_matches(unbroken, tmp_path, sig):
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={tmp_path}', *TINY, *LONG],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  _wait_for_step(tmp_path, 3, process)
  process.send_signal(sig)
  out, err = process.communicate(timeout=120)
  assert process.returncode == exit_codes.PREEMPTED, err
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints')]
  assert len(saved) == 1 and 3 <= saved[0] < 40  # stopped at once, not at the end (40)
  assert f'{sig.name} received: saved step {saved[0]}' in out + err
  assert max(r['step'] for r in metrics.read_metrics(tmp_path)) == saved[0]
  resumed = run_train(tmp_path, *LONG)
  assert resumed.returncode == 0, resumed.stderr
  assert _losses(tmp_path) == _losses(unbroken)
  _assert_same_state(_state(tmp_path, 40), _state(unbroken, 40))


def _array_files(step_dir):
  """Files of array data; which of them a restore reads depends on the OCDBT layout."""
  state = step_dir / 'state'
  return [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs
          if os.path.basename(d) == 'd']


def _truncate_array_files(step_dir):
  for path in _array_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_array_files(step_dir):
  for path in _array_files(step_dir):
    os.remove(path)


CORRUPTIONS = {
    'truncated array files': _truncate_array_files,
    'deleted state metadata': lambda d: os.remove(d / 'state' / '_METADATA'),
    'deleted data iterator state': lambda d: os.remove(d / 'data' / 'process_0-of-1.json'),
    'deleted array files': _delete_array_files,
    'deleted state directory': lambda d: shutil.rmtree(d / 'state'),
}


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_checkpoints')
  result = run_train(workdir)
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_unreadable_newest_checkpoint_is_set_aside_and_the_previous_used(
    two_checkpoints, tmp_path, corruption):
  workdir = tmp_path / 'run'
  shutil.copytree(two_checkpoints, workdir)
  CORRUPTIONS[corruption](workdir / 'checkpoints' / '8')
  result = run_train(workdir)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()  # after the start's notices (e.g. no test split)
  first = next(i for i, line in enumerate(lines) if line.startswith('Skipped'))
  skipped, resumed = lines[first:first + 2]
  assert skipped.startswith('Skipped the checkpoint at step 8: it is unreadable (')
  assert resumed == 'Resumed from the checkpoint at step 4.'
  # One line for the fallback: no report of each read the failed restore abandoned.
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr
  aside = os.listdir(workdir / 'checkpoints_unreadable')
  assert len(aside) == 1 and aside[0].startswith('8-')
  assert _losses(workdir) == _losses(two_checkpoints)
  _assert_same_state(_state(workdir, 8), _state(two_checkpoints, 8))
  # TensorBoard too shows one history: steps 5-8 of the first run are purged, not duplicated.
  assert tensorboard_scalars(workdir, 'train/loss') == [
      (step, pytest.approx(loss)) for step, loss in _losses(workdir)]


def test_no_readable_checkpoint_stops_instead_of_starting_over(two_checkpoints, tmp_path):
  """And keeps refusing, on every rerun (a supervisor's relaunch), until a person acts."""
  workdir = tmp_path / 'run'
  shutil.copytree(two_checkpoints, workdir)
  for step in ('4', '8'):
    os.remove(workdir / 'checkpoints' / step / 'state' / '_METADATA')
  for _ in range(2):
    result = run_train(workdir)
    assert result.returncode == exit_codes.BAD_INPUT, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert 'refusing to start over' in last and f'move {workdir}/checkpoints away' in last
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']
  assert not (workdir / 'checkpoints_unreadable').exists()
  assert _losses(workdir) == _losses(two_checkpoints)  # the metrics history is untouched


def test_sigkill_at_random_moments_then_resume_matches_unbroken_run(unbroken, tmp_path):
  """Kills land anywhere, including inside async checkpoint writes (one every 2 steps)."""
  rng = np.random.default_rng(1234)
  args = [*LONG, '--config.train.checkpoint_every=2']
  command = [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={tmp_path}', *TINY, *args]
  for _ in range(3):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=REPO)
    _wait_for_step(tmp_path, _last_step(tmp_path) + 2, process)
    time.sleep(rng.uniform(0.0, 0.3))
    process.kill()
    process.wait()
  finished = run_train(tmp_path, *args)
  assert finished.returncode == 0, finished.stderr
  assert _losses(tmp_path) == _losses(unbroken)  # its checkpoints were every 1000 steps
  _assert_same_state(_state(tmp_path, 40), _state(unbroken, 40))


@pytest.fixture
def checkpoint_disk(tmp_path):
  """A workdir whose checkpoints/ is a tmpfs of its own, which a test can fill by shrinking it."""
  checkpoints = tmp_path / 'run' / 'checkpoints'
  checkpoints.mkdir(parents=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(checkpoints)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a size-limited tmpfs here: {mounted.stderr.decode().strip()}')
  yield tmp_path / 'run'
  subprocess.run(['umount', str(checkpoints)], check=False)


def _resize(disk, size):
  subprocess.run(['mount', '-o', f'remount,size={size}', str(disk)], check=True)


def _used(disk):
  stats = os.statvfs(disk)
  return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@pytest.mark.parametrize('policy', ['warn', 'stop'])
def test_disk_full_during_save_keeps_earlier_checkpoints(checkpoint_disk, policy):
  """Step 2 is saved, then the disk is full: every later write fails, and step 2 must survive.

  The disk is filled by shrinking it, not by sizing it for N checkpoints: how many bytes Orbax's
  OCDBT store writes for the same state varies about threefold with how its writes batch.
  keep_checkpoints=1, so a failed write taken for a good one would delete step 2 as well.
  """
  workdir, disk = checkpoint_disk, checkpoint_disk / 'checkpoints'
  first = run_train(workdir, '--config.train.stop_after=2', '--config.task.num_samples=0')
  assert first.returncode == 0, first.stderr
  _resize(disk, _used(disk) + 128 * 1024)  # far below the ~420 KB of arrays any checkpoint holds
  result = run_train(workdir, '--config.train.checkpoint_every=2', '--config.task.num_samples=0',
                     '--config.train.keep_checkpoints=1', f'--config.train.on_save_error={policy}')
  assert 'checkpoint write failed' in result.stdout + result.stderr
  assert 'Traceback' not in result.stderr  # each failure is one line
  assert result.returncode == exit_codes.FAILED  # the run ended without its final checkpoint
  last = result.stderr.strip().splitlines()[-1]
  if policy == 'warn':
    assert max(r['step'] for r in metrics.read_metrics(workdir)) == 8
    assert last.startswith('train.py: error: step 8 was not saved (checkpoint write failed')
    assert last.endswith('a rerun resumes from step 2')
    assert not (workdir / 'summary.json').exists()  # the run is not complete
  else:
    assert last.startswith('train.py: error: checkpoint write failed')
  assert sorted(int(n) for n in os.listdir(disk) if n.isdigit()) == [2]
  _state(workdir, 2)  # whole and readable
  _resize(disk, '64m')  # the user frees space and reruns
  resumed = run_train(workdir, '--config.task.num_samples=0')  # partial writes are ignored
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resumed from the checkpoint at step 2' in resumed.stdout


def test_watchdog_dumps_stacks_and_exits_on_a_hung_step(tmp_path):
  started = time.time()
  result = run_train(tmp_path, '--config.train.debug_hang_at_step=6',
                     '--config.train.hang_factor=5', '--config.train.hang_min_seconds=8',
                     '--config.train.eval_every=0')
  assert result.returncode == exit_codes.HUNG, result.stderr
  assert 'Watchdog: no step finished for' in result.stderr
  assert 'Thread' in result.stderr and 'in _steps' in result.stderr  # the stuck frame
  assert time.time() - started < 120
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']  # and the last save is intact
