"""train.py run the way users run it: from their own folder, with the paths they type (relative,
`~`), and with the mistakes they make (a workdir that cannot be created, unusable training files,
an init_from that does not fit): each refused in one line with exit status 2, writing nothing."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.test_faults import _wait_for_step
from tests.test_train_e2e import REPO, TINY, run_train
from training import exit_codes

QUICK = ['--config.task.num_samples=0']


def _checkpoints(workdir):
  names = os.listdir(workdir / 'checkpoints')
  assert not [n for n in names if 'tmp' in n], names  # every write completed
  return sorted(int(n) for n in names)


def _one_line_error(result, start):
  assert result.returncode == exit_codes.BAD_INPUT, result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr


def test_relative_workdir_keeps_its_checkpoints_and_a_rerun_resumes(tmp_path):
  first = run_train('runs/a', *QUICK, '--config.train.stop_after=4', '--compile_cache=cache',
                    cwd=tmp_path)
  assert first.returncode == exit_codes.DONE, first.stderr
  assert 'Traceback' not in first.stderr
  assert _checkpoints(tmp_path / 'runs' / 'a') == [4]
  assert os.listdir(tmp_path / 'cache')  # --compile_cache, relative too
  second = run_train('runs/a', *QUICK, cwd=tmp_path)
  assert second.returncode == exit_codes.DONE, second.stderr
  assert 'Resumed from the checkpoint at step 4' in second.stdout
  assert _checkpoints(tmp_path / 'runs' / 'a') == [4, 8]
  assert json.loads((tmp_path / 'runs' / 'a' / 'summary.json').read_text())['complete']
  # init_from, relative: read from where the user is, and refused before writing anything.
  misfit = run_train('runs/b', '--config.init_from=runs/a', '--config.model.mlp_dim=64',
                     cwd=tmp_path)
  _one_line_error(misfit, 'train.py: error: init_from: params.')
  assert f'in {tmp_path}/runs/a and' in misfit.stderr
  assert os.listdir(tmp_path / 'runs') == ['a']


def test_workdir_under_home_killed_then_rerun_resumes(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  args = [*TINY, *QUICK, '--config.train.steps=16', '--config.train.checkpoint_every=2',
          '--config.train.eval_every=0']
  command = [sys.executable, os.path.join(REPO, 'train.py'), '--workdir=~/run', *args]
  env = {**os.environ, 'HOME': str(home)}
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=tmp_path, env=env)
  _wait_for_step(home / 'run', 5, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  saved = sorted(int(n) for n in os.listdir(home / 'run' / 'checkpoints') if n.isdigit())
  assert saved  # and maybe a write the kill cut short, which the rerun cleans up
  rerun = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600, check=False)
  assert rerun.returncode == exit_codes.DONE, rerun.stderr
  assert f'Resumed from the checkpoint at step {saved[-1]}' in rerun.stdout
  assert _checkpoints(home / 'run')[-1] == 16
  assert not (tmp_path / '~').exists()


def test_a_workdir_that_cannot_be_created_is_a_one_line_error(tmp_path):
  """Its parent looks writable, but cannot be created (a file as parent: test_config_errors)."""
  result = run_train('/proc/podium/run', cwd=tmp_path)
  _one_line_error(result, 'train.py: error: --workdir')
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('content, evaluated', [(b'\xff\xfe\x00garbage' * 64, True),
                                                (b'', False)])
def test_unusable_training_files_are_a_one_line_error_not_a_hang(tmp_path, content, evaluated):
  """Binary or empty files: with evaluation, the eval split is refused before anything is
  written; without, the first training batch ends the run."""
  (tmp_path / 'texts').mkdir()
  for i in range(200):
    (tmp_path / 'texts' / f'{i}.txt').write_bytes(content)
  result = run_train('run', '--config.data.source=files', '--config.data.files=texts/*.txt',
                     f'--config.train.eval_every={4 if evaluated else 0}', cwd=tmp_path)
  _one_line_error(result, 'train.py: error: ')
  assert 'none of the documents of' in result.stderr.strip().splitlines()[-1]
  assert (tmp_path / 'run').exists() != evaluated
