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
from tests.conftest import REPO
from training import config_doc


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
  keys = [line.split(' = ')[0] for line in lines if not line.startswith('#')]
  assert keys == [key for key, _ in _leaves(want)]
  # The override, with the end-of-line comment and its continuation line joined.
  assert "optim.name = 'sgd'  # sgd | adam | adamw | adagrad | adadelta | adamax | rmsprop | " \
         'lion | adafactor | lamb | muon' in lines
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
