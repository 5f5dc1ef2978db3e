"""Local SGD (DiLoCo) against synchronous training on the default job, with 2 simulated slices.

`python benchmarks/local_sgd.py [--sync_every=1,8,32] [--steps=192] [--evals=6]
[--workdir_root=/tmp/podium_local_sgd] [--extra='--config.K=V ...']`

Two tables, for each H in --sync_every (1: synchronous data parallel; H > 1: local SGD with
`train.sync_every=H` and the default outer optimiser, Nesterov SGD 0.7 / 0.9):

1. Bytes that cross slices per step, counted in the compiled programs' collectives
   (`training.aot.hlo_cost`) on 2 CPU devices, one per slice (`mesh.data=2`), so every
   collective crosses slices: the inner step (every step), the outer step (every H steps) and
   the two amortised per step. H=1's inner step is the synchronous train step.
2. Eval loss against step: one train.py run per H on configs/default.py with
   `--config.train.steps=--steps` (the same batches, so the same token budget, for every H),
   evaluated --evals times, in one process with 2 CPU devices, one replica on each.
"""

import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2').strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from benchmarks import classifier_accuracy as bench  # pylint: disable=wrong-import-position
from configs import default
from parallel import sharding
from tasks import base
from training import aot, local_sgd
from training import state as state_lib
from training import step as step_lib

_SYNC_EVERY = flags.DEFINE_list('sync_every', ['1', '8', '32'], 'H values; 1 is synchronous')
_STEPS = flags.DEFINE_integer('steps', 192, 'train steps of every run (the same token budget)')
_EVALS = flags.DEFINE_integer('evals', 6, 'evaluations along each run')
_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_local_sgd', 'one workdir per run')
_EXTRA = flags.DEFINE_string('extra', '', 'more train.py flags for every run')

TWO_SLICES = ['--config.mesh.data=2', '--config.mesh.fsdp=1', '--config.mesh.tensor=1']


def _config(sync_every: int):
  config = default.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 1
  config.train.sync_every = max(sync_every, 2)  # H=1's inner step is built apart, below
  return config


def _collective_bytes(fn, *args) -> float:
  return aot.hlo_cost(jax.jit(fn).lower(*args).compile().as_text()).collective_bytes


def cross_slice_bytes(sync_every: int) -> tuple[float, float]:
  """(inner step, outer step) bytes per device that cross slices, each time it runs."""
  config = _config(sync_every)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  batch = base.batch_shardings(setup.task.batch_spec('train'), mesh, config.mesh.rules)
  batch = {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=batch[k])
           for k, f in setup.task.batch_spec('train').items()}
  with sharding.activate(mesh, config.mesh.rules):
    if sync_every == 1:
      config.train.sync_every = 1
      synchronous = state_lib.make_setup(config, mesh)
      train_step, _ = step_lib.compile_steps(synchronous, config, mesh)
      return _collective_bytes(train_step, synchronous.abstract_state, batch), 0.0
    state = setup.abstract_state
    inner = functools.partial(local_sgd.inner_step, config=config, step_fn=functools.partial(
        step_lib.train_step, setup=setup, config=config))
    outer = functools.partial(local_sgd.sync, outer_tx=setup.outer_tx)
    return (_collective_bytes(inner, state, batch),
            _collective_bytes(outer, state['params'], state['opt_state'],
                              state['local']['params']))


def eval_losses(sync_every: int) -> dict[int, float]:
  steps = _STEPS.value
  train_flags = [*TWO_SLICES, f'--config.train.sync_every={sync_every}',
                 f'--config.train.steps={steps}', f'--config.train.checkpoint_every={steps}',
                 f'--config.train.eval_every={max(steps // _EVALS.value, 1)}',
                 '--config.task.num_samples=0', *_EXTRA.value.split()]
  workdir = os.path.join(_ROOT.value, f'sync_every_{sync_every}')
  print(f'H={sync_every}: train.py {" ".join(train_flags)}', flush=True)
  run = bench.run_train(bench.config_arg('default'), workdir, train_flags)
  if run.returncode:
    print(f'H={sync_every}: {bench.failure(run)}', flush=True)
    return {}
  print(f'H={sync_every}: {run.wall_s:.0f} s', flush=True)
  return {r['step']: r['eval/loss'] for r in run.records if 'eval/loss' in r}


def _kib(n: float) -> str:
  return f'{n / 2**10:.1f}'


def main(argv):
  del argv
  values = [int(h) for h in _SYNC_EVERY.value]
  print('KiB crossing slices per device (2 slices of 1 CPU device each):')
  print(f'{"H":>4} {"inner step":>11} {"outer step":>11} {"per step":>11}')
  for h in values:
    inner, outer = cross_slice_bytes(h)
    print(f'{h:>4} {_kib(inner):>11} {_kib(outer):>11} {_kib(inner + outer / h):>11}',
          flush=True)
  curves = {h: eval_losses(h) for h in values}
  steps = sorted({s for curve in curves.values() for s in curve})
  print(f'\nEval loss against step ({_STEPS.value} steps, configs/default.py, 2 replicas):')
  print(f'{"step":>6} ' + ' '.join(f'{"H=" + str(h):>8}' for h in values))
  for s in steps:
    print(f'{s:>6} ' + ' '.join(f'{curves[h].get(s, float("nan")):8.4f}' for h in values))


if __name__ == '__main__':
  app.run(main)
