"""The config on the command line: `train.py --help` lists the experiments and their presets,
`--print_config` prints a resolved config, every key with its declaration's comment."""

import glob
import importlib
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import default
from data import choices
from tests.conftest import REPO
from training import config_check, config_doc, optimizer


def _train(*args):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _experiments():
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                if 'def get_config' in open(p, encoding='utf-8').read())


def test_print_config_prints_the_resolved_config_with_comments():
  result = _train('--config=configs/default.py:tiny', '--config.optim.name=sgd', '--print_config')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  want = default.get_config('tiny')
  want.optim.name = 'sgd'
  config_check.keep_chosen(want, {'optim.name'})
  keys = [line.split(' = ')[0] for line in lines if not line.startswith('#')]
  assert keys == [key for key, _ in _leaves(want)]
  # Only the chosen optimiser's, schedule's and clipping's keys: what the run reads.
  assert 'optim.sgd.momentum' in keys and 'optim.final_lr_fraction' in keys
  assert not {'optim.adamw.b1', 'optim.decay_rate', 'optim.grad_clip_value'} & set(keys)
  # The override, with its registry's comment listing every name.
  assert "optim.name = 'sgd'  # the optimiser (its keys: optim.<name>): sgd | adam | adamw | " \
         f'adagrad | adadelta | adamax | rmsprop | lion | adafactor | lamb' \
         f'{" | muon" if "muon" in optimizer.OPTIMIZERS else ""}' in lines
  assert 'model.num_layers = 2' in lines  # the preset's value
  # A comment block above a declaration stays above it.
  i = lines.index('mesh.data = -1')
  assert lines[i - 1].startswith('# Sizes within a slice (ICI)')


@pytest.mark.parametrize('name', _experiments())
def test_every_key_of_every_experiment_is_printed_with_its_value(name):
  path = os.path.join(REPO, 'configs', f'{name}.py')
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  printed = config_doc.print_config(config, f'{path}:tiny').splitlines()
  values = [line.split('  # ')[0] for line in printed if not line.startswith('#')]
  assert values == [f'{key} = {value!r}' for key, value in _leaves(config)]
  assert sum('  # ' in line for line in printed) > 10  # the keys of sections shared by all


def test_help_lists_every_experiment_with_exactly_its_presets():
  result = _train('--help')
  assert '--print_config' in result.stdout and 'Traceback' not in result.stderr
  listed = dict(re.findall(r'^  configs/(\w+)\.py\[:([\w,]+)\]$', result.stdout, re.M))
  assert sorted(listed) == _experiments()
  for name, presets in listed.items():
    get_config = importlib.import_module(f'configs.{name}').get_config
    with pytest.raises(ValueError, match='choose from') as error:
      get_config('no_such_preset')
    assert str(error.value).split('choose from ')[1] == presets.replace(',', ', ')


def test_the_readme_names_every_registered_choice():
  """The README passages that name a choice's key list every registered name of it."""
  default.get_config()  # every registry the configs use is imported
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    passages = f.read().split('\n- ')
  assert {r.path for r in choices.REGISTRIES} >= {'optim.name', 'train.nonfinite_policy'}
  for registry in choices.REGISTRIES:
    passage = ' '.join(p for p in passages if registry.path in p)
    missing = [name for name in registry if not re.search(rf'\b{name}\b', passage)]
    assert passage and not missing, f'README.md, {registry.path}: {missing or "no passage"}'
