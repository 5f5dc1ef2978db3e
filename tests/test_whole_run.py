"""benchmarks/whole_run.py, as someone checking where a run's time goes would use it."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO

_SCRIPT = os.path.join(REPO, 'benchmarks', 'whole_run.py')


def _whole_run(tmp_path, *args):
  # One device, as a user's run has on a CPU host (conftest's eight only slow the run down).
  xla_flags = os.environ['XLA_FLAGS'].replace('--xla_force_host_platform_device_count=8', '')
  return subprocess.run([sys.executable, _SCRIPT, f'--workdir={tmp_path}/w', *args],
                        cwd=tmp_path, capture_output=True, text=True, check=False,
                        env={**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': xla_flags})


def test_the_phase_table_accounts_for_the_whole_run(tmp_path):
  done = _whole_run(tmp_path, '--config=configs/default.py:tiny', '--nostep_time')
  assert done.returncode == 0, done.stderr[-3000:]
  table = dict(re.findall(r'^(\S.*?)\s+(-?\d+\.\d\d)(?: |$)', done.stdout, re.MULTILINE))
  for phase in ('interpreter and imports', 'config, mesh and data set-up',
                'exit (teardown)'):
    assert float(table[phase]) > 0, done.stdout
  assert float(table['total: the sum of the rows']) == float(table['measured wall'])
  assert re.search(r'compiles .*train_step \d', done.stdout), done.stdout
  assert re.search(r'steady steps: \d+, step and host work around it', done.stdout)


def test_a_missing_data_file_is_one_line_and_status_2(tmp_path):
  done = _whole_run(tmp_path, '--job=char', f'--data={tmp_path}/nowhere.txt')
  assert done.returncode == 2
  assert done.stderr.strip().count('\n') == 0 and 'nowhere.txt does not exist' in done.stderr
