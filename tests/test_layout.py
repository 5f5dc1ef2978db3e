"""The folders are layers: a module may import its own folder and the folders below it, never
one above (train.py and benchmarks/ sit on top of them all; tools/ is the top layer: programs
over a workdir that train.py wrote)."""

import ast
import pathlib

from tests.conftest import REPO

# Lowest first.
# configs/ sits above training/: a config is assembled from the sections their owners declare
# (training/config_check.py, training/health.py, parallel/sharding.py).
LAYERS = ('hardware', 'parallel', 'models', 'data', 'prepare', 'tasks', 'training', 'configs',
          'tools')


def _imported_modules(path: pathlib.Path):
  """Dotted names of the modules `path` imports, anywhere in it: `from models import mlp` is
  models.mlp when models/mlp.py exists, else models (a name from the package)."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        module = f'{node.module}.{alias.name}'
        yield module if (pathlib.Path(REPO, *module.split('.')).with_suffix('.py').exists()
                         or pathlib.Path(REPO, *module.split('.')).is_dir()) else node.module


def _imported_packages(path: pathlib.Path):
  yield from (name.split('.')[0] for name in _imported_modules(path))


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


# What training/ may import from models/ and tasks/: the registries (the packages themselves,
# MODELS and TASKS), the interface every task implements and the loop's parts extend
# (tasks.base), and the per-platform settings every model shares (models.platforms).
ENGINE_MAY_IMPORT = {'models', 'models.lora', 'models.platforms', 'tasks', 'tasks.base'}


def test_the_trainer_names_no_task_and_no_model():
  """A module under training/ imports from models/ and tasks/ only ENGINE_MAY_IMPORT: never a
  model (models.transformer, models.layers, ...) or a task (tasks.language_model, ...), which
  it reaches through the registries. So a new model or task never edits the trainer."""
  named = [f'{path.relative_to(REPO)} imports {module}'
           for path in sorted(pathlib.Path(REPO, 'training').rglob('*.py'))
           for module in _imported_modules(path)
           if module.split('.')[0] in ('models', 'tasks') and module not in ENGINE_MAY_IMPORT]
  assert not named, named


def test_no_import_cycle():
  paths = {'.'.join(p.relative_to(REPO).with_suffix('').parts): p
           for layer in LAYERS for p in (pathlib.Path(REPO) / layer).rglob('*.py')}
  graph = {name: {m for m in _imported_modules(path) if m in paths} - {name}
           for name, path in paths.items()}
  done, cycles = set(), []

  def visit(name, stack):
    if name in stack:
      cycles.append(' -> '.join(stack[stack.index(name):] + [name]))
    elif name not in done:
      for imported in sorted(graph[name]):
        visit(imported, stack + [name])
      done.add(name)

  for name in sorted(graph):
    visit(name, [])
  assert not cycles, cycles
