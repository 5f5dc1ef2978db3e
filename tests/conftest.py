"""Every test sees 8 CPU devices, so each sharding layout runs for real."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def tiny_config():
  """A two-layer model over 32-token sequences, unlocked so tests can adjust it."""
  return default.get_config('tiny')


@pytest.fixture(scope='session', autouse=True)
def shared_compile_cache(tmp_path_factory):
  """One compile cache (per test worker) for every train.py the tests start: a program any
  earlier run compiled is loaded, not compiled again. Set after collection, when this process's
  JAX has read its settings, so only child processes see it."""
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.getbasetemp() / 'compile_cache')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # every compile, however short
