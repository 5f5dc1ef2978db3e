"""Trains a model: `python train.py --workdir=DIR [--config=configs/default.py[:presets]]`.

Override any config key with `--config.<section>.<key>=<value>`. Rerunning the same command
resumes from the newest checkpoint in DIR. Config problems exit with status 2 and one line.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')

_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file[:presets].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.',
                               required=True)


def _usage_error(message: str):
  sys.stderr.write(f'train.py: error: {message.strip().splitlines()[0]}\n')
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with errors (bad types, unknown keys, missing files) as one line, status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(str(e))


def main(argv):
  if len(argv) > 1:
    _usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  import jax  # pylint: disable=g-import-not-at-top; after flags, so --help stays fast
  from training import config_check, loop  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config_check.validate(config, jax.device_count(), jax.process_count())
    loop.train(config, _WORKDIR.value)
  except config_check.ConfigError as e:
    _usage_error(f'config {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
