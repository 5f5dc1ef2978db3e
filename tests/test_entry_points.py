"""Every tool as a user gets it: `pip install .` (not -e), run from another folder, with neither
the checkout nor its folder on sys.path."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

# The tools' flags that --help must list, by command.
TOOLS = {
    ('-m', 'train'): '--workdir',
    ('-m', 'tools.sample'): '--new_tokens',
    ('-m', 'tools.hf'): '--hf_dir',
    ('-m', 'prepare'): '--eval_percent',
}


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """The checkout installed as `pip install .` does it (no dependencies: those are the venv's),
  into a folder of its own; built from a copy, so the checkout gets no build/ folder."""
  pytest.importorskip('setuptools', reason='pip builds the package with setuptools')
  root = tmp_path_factory.mktemp('install')
  source, target = root / 'source', root / 'site'
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      '.git', 'build', '*.egg-info', '__pycache__', '.pytest_cache'))
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index',
                  '--no-build-isolation', '--target', str(target), str(source)],
                 check=True, capture_output=True, timeout=300)
  return target


def _run(site, cwd, *args):
  """`python *args` in `cwd` seeing podium only as installed in `site`."""
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'JAX_PLATFORMS')}
  return subprocess.Popen([sys.executable, *args], cwd=cwd, env={**env, 'PYTHONPATH': str(site)},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _packages(directory) -> set[str]:
  return {p.parent.name for p in directory.glob('*/__init__.py')}


def test_every_package_of_the_checkout_is_installed(installed):
  assert _packages(pathlib.Path(REPO)) - {'tests'} <= _packages(installed)
  assert 'tests' not in _packages(installed)
  assert (installed / 'train.py').exists()


def test_each_tool_runs_from_another_folder(installed, tmp_path):
  runs = {tool: _run(installed, tmp_path, *tool, '--help') for tool in TOOLS}
  for tool, process in runs.items():
    out, err = process.communicate(timeout=300)
    assert 'Traceback' not in err and TOOLS[tool] in out, (tool, err[-2000:])


def test_every_config_loads_from_the_installed_package(installed, tmp_path):
  script = ('import configs, importlib, pkgutil\n'
            'print(configs.__file__)\n'
            'for m in pkgutil.iter_modules(configs.__path__):\n'
            '  module = importlib.import_module("configs." + m.name)\n'
            '  if hasattr(module, "get_config"):\n'
            '    module.get_config().lock(), module.get_config("tiny").lock()\n'
            '    print(m.name)\n')
  out, err = _run(installed, tmp_path, '-c', script).communicate(timeout=300)
  assert out.splitlines()[0] == str(installed / 'configs' / '__init__.py'), err
  in_checkout = {name[:-3] for name in os.listdir(os.path.join(REPO, 'configs'))
                 if name.endswith('.py') and 'def get_config' in open(
                     os.path.join(REPO, 'configs', name), encoding='utf-8').read()}
  assert set(out.splitlines()[1:]) == in_checkout, err
