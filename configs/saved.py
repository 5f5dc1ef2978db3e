"""A run's WORKDIR/config.json read back as the config it was written from.

The file is JSON, so tuples came back as lists; and keys added since the run was written are
missing. Both are mended against the current defaults of the run's task and model.
"""

import json

from etils import epath
import ml_collections

from configs import common
from data import sources


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`; ValueError when it has none or it cannot be read."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise ValueError(f'--workdir: {path} does not exist: not a train.py workdir')
  try:
    saved = json.loads(path.read_text())
    config = common.build(saved['task']['name'], saved['model']['name'])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'--workdir: cannot read {path}: {type(e).__name__}: {e}') from None
  _update(config, saved, '')
  return config


def _update(config, saved: dict, prefix: str):
  for key, value in saved.items():
    key = sources.RENAMED.get(key, key) if prefix == 'data.' else key  # a run from before
    if key not in config:
      raise ValueError(f'--workdir: its config.json has {prefix}{key}, which podium no longer '
                       'has')
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value, f'{prefix}{key}.')
    else:
      config[key] = _as_tuples(value) if isinstance(config[key], tuple) else value


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value
