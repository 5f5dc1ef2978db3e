"""How long checkpoints hold up training: `python benchmarks/checkpoint_time.py`.

For the default model and a ~100M-parameter one, prints: the time the training thread is
blocked by an async save (until `save` returns) against a synchronous save, the time until the
async write is finished, and the restore time. Then the time from SIGTERM to a finished
checkpoint and a clean exit of a real `train.py` run. Prints figures only; asserts nothing.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from configs import default as default_config
from data import pipeline, sources
from parallel import sharding
from training import checkpointing, metrics, state as state_lib

_REPEATS = flags.DEFINE_integer('repeats', 3, 'Saves timed per mode; the median is printed.')
_MODELS = flags.DEFINE_list('models', ['default', '100m'], 'Models to time.')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
  config = default_config.get_config()
  if name == '100m':  # 14 layers x 12 d^2 at d=768: ~99M parameters
    config.model.update(num_layers=14, embed_dim=768, mlp_dim=3072, num_heads=12, num_kv_heads=12)
  return config


def _median(values):
  return sorted(values)[len(values) // 2]


def _time_saves(config, state, data_iter, asynchronous: bool):
  blocked, finished = [], []
  for i in range(_REPEATS.value):
    with tempfile.TemporaryDirectory() as workdir:
      config.train.keep_checkpoints = 1
      manager = checkpointing.make_manager(workdir, config.train, asynchronous)
      start = time.perf_counter()
      checkpointing.save(manager, i + 1, state, data_iter, every=1, final=True)
      blocked.append(time.perf_counter() - start)
      manager.wait_until_finished()
      finished.append(time.perf_counter() - start)
      manager.close()
  return _median(blocked), _median(finished)


def _time_restore(config, setup, state, data_iter):
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpointing.make_manager(workdir, config.train)
    checkpointing.save(manager, 1, state, data_iter, every=1, final=True)
    manager.wait_until_finished()
    start = time.perf_counter()
    _, restored, _, _ = checkpointing.restore_latest(manager, setup.abstract_state, data_iter)
    jax.block_until_ready(restored)
    manager.close()
    return time.perf_counter() - start


def bench_model(name):
  config = _config(name)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  state = state_lib.init_state(config, setup)
  data_iter = iter(pipeline.batches(sources.make_source(config.data, 'train'), seq_len=16,
                                    batch_size=2, seed=0, shuffle=True))
  next(data_iter)
  params = state_lib.count_params(state['params'])
  size = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  async_blocked, async_done = _time_saves(config, state, data_iter, asynchronous=True)
  sync_blocked, _ = _time_saves(config, state, data_iter, asynchronous=False)
  restore = _time_restore(config, setup, state, data_iter)
  print(f'{name}: {params / 1e6:.1f}M params, state {size:.0f} MiB | training blocked by save: '
        f'async {async_blocked * 1e3:.0f} ms (write done after {async_done * 1e3:.0f} ms), '
        f'sync {sync_blocked * 1e3:.0f} ms | restore {restore * 1e3:.0f} ms', flush=True)


def bench_sigterm():
  """SIGTERM during a real run of the default job -> checkpoint written and process gone."""
  with tempfile.TemporaryDirectory() as workdir:
    run = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={workdir}',
                            '--config.train.checkpoint_every=100000'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    while not metrics.read_metrics(workdir):
      time.sleep(0.1)
    start = time.perf_counter()
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate()
    elapsed = time.perf_counter() - start
    saved = os.listdir(os.path.join(workdir, 'checkpoints'))
    line = [l for l in output.splitlines() if 'received' in l]
    print(f'SIGTERM -> checkpoint {saved} written and exit {run.returncode} in '
          f'{elapsed * 1e3:.0f} ms ({line[-1].strip() if line else "no message"})')


def main(argv):
  del argv
  print(f'{jax.device_count()} {jax.default_backend()} device(s)')
  for name in _MODELS.value:
    bench_model(name)
  bench_sigterm()


if __name__ == '__main__':
  app.run(main)
