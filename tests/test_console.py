"""What the tools print, run as a user runs them (another folder, relative paths, libtpu installed
on a CPU host): their own lines by default, library logs with --verbosity=1 and in the
workdir's log file, and bad input as one line with exit status 2 before anything loads."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Lines libraries print on runs that work.
NOISE = ('Failed to find host bounds', 'unexpected worker hostname', 'Source Location Trace',
         "Unable to initialize backend 'tpu'", 'Metadata file does not exist')
ABSL_LINE = re.compile(r'^[IWE]\d{4} ', re.M)  # absl's prefix: level, month, day
TINY = f'--config={os.path.join(REPO, "configs", "default.py")}:tiny'


def _run(cwd, *args):
  """`python *args` in `cwd`, as a user's shell runs it: JAX picks its platform itself."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def _assert_quiet(result):
  assert result.returncode == 0, result.stderr
  noise = [n for n in NOISE if n in result.stderr] + ABSL_LINE.findall(result.stderr)
  assert not noise, result.stderr[-3000:]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run, trained from a folder of its own; (the workdir, train.py's result)."""
  home = tmp_path_factory.mktemp('user')
  result = _run(home, os.path.join(REPO, 'train.py'), f'--workdir={home / "run"}', TINY)
  return home / 'run', result


def test_train_prints_its_own_lines_and_keeps_the_library_log_in_the_workdir(trained):
  workdir, result = trained
  _assert_quiet(result)
  [log] = glob.glob(str(workdir / 'logs' / 'train.*.log'))
  with open(log, encoding='utf-8') as f:
    lines = f.read()
  assert re.search(r'^I\d{4} .*orbax', lines, re.M), lines[:2000]  # INFO, though the console hid it


def test_sample_from_another_folder_with_a_relative_workdir(trained, tmp_path):
  workdir, _ = trained
  relative = os.path.relpath(workdir, tmp_path)
  sample = ['-m', 'tools.sample', f'--workdir={relative}', '--prompt=def ', '--new_tokens=4']
  quiet = _run(tmp_path, *sample)
  _assert_quiet(quiet)
  assert quiet.stdout.startswith('--- sample ---\ndef ')
  verbose = _run(tmp_path, *sample, '--verbosity=1')
  assert verbose.returncode == 0 and ABSL_LINE.search(verbose.stderr), verbose.stderr
  assert 'Metadata file does not exist' in verbose.stderr  # a known-harmless warning, hidden above


def test_hf_export_and_import_from_another_folder(trained, tmp_path):
  workdir, _ = trained
  exported = _run(tmp_path, '-m', 'tools.hf', 'export', f'--workdir={workdir}', '--out=hf')
  _assert_quiet(exported)
  imported = _run(tmp_path, '-m', 'tools.hf', 'import', '--hf_dir=hf', '--workdir=imported',
                  TINY)
  _assert_quiet(imported)
  assert f'--config.init_from={tmp_path / "imported"}' in imported.stdout
  assert glob.glob(str(tmp_path / 'imported' / 'logs' / 'hf.*.log'))
  _assert_quiet(_run(tmp_path, '-m', 'tools.sample', '--workdir=imported', '--new_tokens=2'))


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (tpu extra)')
def test_compile_only_prints_only_its_report(tmp_path):
  result = _run(tmp_path, os.path.join(REPO, 'train.py'), '--compile_only', '--topology=v5e-4',
                TINY)
  _assert_quiet(result)
  assert result.stdout.startswith('v5e-4: 4 x TPU v5 lite')


def _one_line_error(result, *expected):
  assert result.returncode == 2, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  for text in expected:
    assert text in result.stderr, result.stderr


@pytest.mark.parametrize('flag, expected', [
    ('--new_tokens=-1', '--new_tokens=-1: must be >= 1'),
    ('--top_p=0', '--top_p=0.0: must be in (0, 1]'),
    ('--new_tokens=many', 'flag --new_tokens=many'),
])
def test_sample_checks_its_flags_before_loading_anything(tmp_path, flag, expected):
  """The workdir does not exist: the flag is what the error names, so it was checked first."""
  result = _run(tmp_path, '-m', 'tools.sample', '--workdir=nowhere', flag)
  _one_line_error(result, 'tools.sample: error: ', expected)


def test_tool_errors_are_one_line_and_status_2(trained, tmp_path):
  workdir, _ = trained
  _one_line_error(_run(tmp_path, '-m', 'tools.sample'), '--workdir')
  _one_line_error(_run(tmp_path, '-m', 'tools.sample', f'--workdir={workdir}',
                       '--top_k=1000'), '--top_k=1000: the model has only 256 tokens')
  _one_line_error(_run(tmp_path, '-m', 'tools.hf'), 'import|export')
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'n_head': 4}))
  _one_line_error(_run(tmp_path, '-m', 'tools.hf', 'import', '--hf_dir=hf', '--workdir=w'),
                  f"{tmp_path / 'hf' / 'config.json'} lacks the key 'n_layer'")


def test_a_missing_optional_dependency_names_its_extra(tmp_path):
  """--compile_only on a host without libtpu (hidden from the import system here)."""
  hide_libtpu = ('import runpy, sys\n'
                 'class HideLibtpu:\n'
                 '  def find_spec(self, name, path=None, target=None):\n'
                 '    if name.split(".")[0] == "libtpu":\n'
                 '      raise ModuleNotFoundError(f"No module named {name!r}", name=name)\n'
                 'sys.meta_path.insert(0, HideLibtpu())\n'
                 'sys.argv = sys.argv[1:]\n'
                 'runpy.run_path(sys.argv[0], run_name="__main__")\n')
  result = _run(tmp_path, '-c', hide_libtpu, os.path.join(REPO, 'train.py'), '--compile_only',
                '--topology=v5e-4', TINY)
  _one_line_error(result, "train.py: error: --compile_only needs libtpu, from podium's tpu extra: "
                          "pip install -e '.[tpu]'")
