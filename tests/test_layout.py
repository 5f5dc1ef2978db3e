"""The folders are layers: a module may import its own folder and the folders below it, never
one above (train.py and benchmarks/ sit on top of them all)."""

import ast
import pathlib

from tests.conftest import REPO

# Lowest first.
LAYERS = ('hardware', 'parallel', 'models', 'data', 'tasks', 'training', 'configs')


def _imported_packages(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module]
    else:
      continue
    yield from (name.split('.')[0] for name in names)


def test_no_module_imports_a_layer_above_its_own():
  upward = []
  for rank, layer in enumerate(LAYERS):
    for path in sorted((pathlib.Path(REPO) / layer).rglob('*.py')):
      upward += [f'{path.relative_to(REPO)} imports {package}'
                 for package in _imported_packages(path)
                 if package in LAYERS and LAYERS.index(package) > rank]
  assert not upward, upward


def test_every_package_is_a_layer():
  packages = {p.parent.name for p in pathlib.Path(REPO).glob('*/__init__.py')}
  assert packages - {'tests', 'benchmarks'} == set(LAYERS)
