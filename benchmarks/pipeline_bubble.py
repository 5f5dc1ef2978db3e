"""Step time of a small decoder split into 1, 2 and 4 pipeline stages on 8 CPU devices:
`python benchmarks/pipeline_bubble.py [--steps=20]`.

Each row runs the real train step (config -> mesh -> make_setup/init_state -> compile_steps under
`sharding.activate`) with `mesh.stage` stages and the rest of the 8 devices data parallel. The
GPipe schedule (parallel/pipeline.py) runs every stage on every tick, so its bubble ticks are
computed (on nothing useful) rather than waited for. The 8 host-platform devices share this
machine's cores, so a step's time follows the work of all devices together, and the bubble shows
as extra time: measured bubble = 1 - (1-stage time) / (S-stage time), to compare with GPipe's
(S-1)/(M+S-1). The measured share also holds what the formula leaves out: each device's
matmuls are M times smaller (a micro-batch of its rows; slower per FLOP on a CPU), a
collective-permute between stages every tick, and the embedding and loss, which every stage
computes for the whole batch. Prints figures only.
"""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app, flags

from configs import default
from parallel import pipeline, sharding
from training import state as state_lib
from training import step as step_lib

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per row.')
# (stages, micro-batches): one micro-batch per stage, then four.
ROWS = ((1, 1), (2, 2), (2, 8), (4, 4), (4, 16))


def _config(stages: int, microbatches: int):
  config = default.get_config('tiny')
  config.model.update(num_layers=8, embed_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=256,
                      max_len=64, scan_layers=True, pipeline_microbatches=microbatches)
  config.data.update(seq_len=64, global_batch_size=32)
  config.mesh.update(stage=stages, data=-1, fsdp=1, tensor=1)
  return config


def _median_step_seconds(config) -> float:
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  rng = np.random.default_rng(0)
  shape = (config.data.global_batch_size, config.data.seq_len + 1)
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    times = []
    for i in range(_STEPS.value + 3):  # the first 3 untimed: compile and warm-up
      batch = {'tokens': rng.integers(0, 256, shape, dtype=np.int32),  # one document a row
               'segment_ids': np.ones(shape, np.int32),
               'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)}
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
      if i >= 3:
        times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(_):
  print(f'8 layers, width 64, batch 32 x 64 tokens, {jax.device_count()} CPU devices, '
        f'{os.cpu_count()} cores; median of {_STEPS.value} steps')
  print(f'{"stages":>6} {"micro":>5} {"ms/step":>8} {"measured bubble":>16} {"(S-1)/(M+S-1)":>14}')
  base = None
  for stages, microbatches in ROWS:
    seconds = _median_step_seconds(_config(stages, microbatches))
    base = base or seconds
    print(f'{stages:>6} {microbatches:>5} {seconds * 1e3:>8.1f} {1 - base / seconds:>16.1%} '
          f'{pipeline.bubble_fraction(stages, microbatches):>14.1%}', flush=True)


if __name__ == '__main__':
  app.run(main)
