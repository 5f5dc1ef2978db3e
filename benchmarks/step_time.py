"""Times the real train step: `python benchmarks/step_time.py [--configs=default,small]`.

Goes through the project's own code path (config -> mesh -> make_setup/init_state ->
compile_steps under `sharding.activate`), one fresh process per config so that each peak RSS is
its own, and prints for each: median ms/step over --steps steps (each waited for), tokens/s,
peak RSS, minor page faults per step, the step's FLOPs (XLA's cost analysis and the analytic
count, 6 per matmul parameter and token plus causal attention, models/flops.py) and the step's
FLOP/s as a fraction of this machine's float32 matmul rate
(`hardware.chips.matmul_flops_per_second`, in the parent process). Prints figures only.

Configs (benchmarks/bench_configs.py):
  default  configs/default.py with no presets (random byte tokens).
  small    a char-level GPT-2: 4 layers, 4 heads, 128 wide (MLP 512), vocab 65, sequence 64,
           batch 12, AdamW in float32, dropout 0 (tinyshakespeare characters when --data exists,
           else random tokens).
  default_health  the default with gradient health on (per-layer norms in every step).
`--config=FILE[:presets]` (with `--config.<key>=<value>` overrides, as train.py takes them)
times that config instead, any task: language models on --data's characters or random tokens,
other tasks on random batches of their declared shapes (benchmarks/whole_run.py uses this).
The machine is shared: the share of CPU other processes used while timing is printed too.
Its speed also drifts by a quarter between hours, so compare with a reference timed alongside:
`benchmarks/torch_reference.py` times the small model in PyTorch (needs torch).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resource  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics
import subprocess
import time

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.bench_configs import CONFIGS

from hardware import chips, cpu_runtime
from parallel import sharding
from tasks import base, language_model
from training import aot, state as state_lib, step as step_lib

_CONFIGS = flags.DEFINE_list('configs', ['default', 'small'], 'Configs to time, one process each.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed steps per config.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps after compiling.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'Devices in the mesh (data parallel).')
_DATA = flags.DEFINE_string('data', '/work/shared/data/tinyshakespeare.txt',
                            'Characters for the small config; random tokens if missing.')
_LOW_MEMORY = flags.DEFINE_bool('low_memory', False, 'cpu_runtime.configure(low_memory=True).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file[:presets] to time '
                                         'instead of --configs (any task).')
_MATMUL_GFLOPS = flags.DEFINE_float('matmul_gflops', 0, 'The machine matmul rate (set by the '
                                    'parent process; 0 measures it here).')


def _batches(config, rng):
  """Endless [B, L+1] token batches: characters of --data if it fits the vocabulary."""
  b, l1, vocab = config.data.global_batch_size, config.data.seq_len + 1, config.model.vocab_size
  text = None
  if os.path.exists(_DATA.value):
    with open(_DATA.value, encoding='utf-8') as f:
      chars = f.read()
    alphabet = sorted(set(chars))
    if len(alphabet) <= vocab:
      index = {c: i for i, c in enumerate(alphabet)}
      text = np.fromiter((index[c] for c in chars), np.int32, len(chars))
  while True:
    if text is None:
      yield rng.integers(0, vocab, (b, l1), dtype=np.int32)
    else:
      starts = rng.integers(0, len(text) - l1, b)
      yield np.stack([text[s:s + l1] for s in starts])


def _random_batches(spec, rng):
  """Endless batches of `spec`'s shapes: N(0, 1) floats, integers 0 or 1 (labels, masks)."""
  while True:
    yield {k: (rng.standard_normal(f.shape).astype(f.dtype)
               if np.issubdtype(f.dtype, np.floating) else rng.integers(0, 2, f.shape, f.dtype))
           for k, f in spec.items()}


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def _busy_seconds_of_others() -> float:
  """CPU seconds all other processes have used so far (from /proc/stat); 0 where unavailable."""
  try:
    with open('/proc/stat', encoding='ascii') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return 0.0
  own = os.times()
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK') - own.user - own.system


def time_config(name, matmul_rate):
  config = _CONFIG.value if name == 'config' else CONFIGS[name]()
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:_DEVICES.value])
  setup = state_lib.make_setup(config, mesh)
  place = base.batch_placer(setup.task.batch_spec('train'), mesh, config.mesh.rules)
  if config.task.name == 'lm':
    batches = map(language_model.one_document_per_row, _batches(config, np.random.default_rng(0)))
  else:
    batches = _random_batches(setup.task.batch_spec('train'), np.random.default_rng(0))
  put = lambda: place(next(batches))
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, put()).compile()
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, put())
    jax.block_until_ready(state)
    times, faults0, others0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt, \
        _busy_seconds_of_others()
    for _ in range(_STEPS.value):
      tokens = put()
      start = time.perf_counter()
      state, metrics = compiled(state, tokens)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / _STEPS.value
    others = max(0.0, (_busy_seconds_of_others() - others0) / sum(times))
  step_s = statistics.median(times)
  unit = 'tokens' if config.task.name == 'lm' else 'examples'
  tokens_per_step = config.data.global_batch_size * (config.data.seq_len if unit == 'tokens'
                                                     else 1)
  flops_xla, flops_model = xla_flops(compiled), aot.train_flops_per_step(config, setup.model_module)
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
  shape = f' x {config.data.seq_len}' if unit == 'tokens' else ''
  print(f'[{name}] {state_lib.count_params(state["params"]) / 1e6:.2f}M params, batch '
        f'{config.data.global_batch_size}{shape}, compiled in {compile_s:.1f} s, '
        f'loss {float(metrics["train/loss"]):.4f}')
  print(f'  step        median {step_s * 1e3:.2f} ms (p10 {np.percentile(times, 10) * 1e3:.2f}, '
        f'p90 {np.percentile(times, 90) * 1e3:.2f}) over {len(times)} steps')
  print(f'  throughput  {tokens_per_step / step_s:,.0f} {unit}/s')
  print(f'  memory      peak RSS {rss_mib:.0f} MiB, {faults:.0f} minor page faults/step')
  print(f'  FLOPs       {flops_model / 1e9:.3f} G/step analytic, {flops_xla / 1e9:.3f} G/step XLA')
  print(f'  FLOP/s      {flops_model / step_s / 1e9:.1f} G/s = '
        f'{flops_model / step_s / matmul_rate:.0%} of the matmul rate '
        f'(XLA count: {flops_xla / step_s / matmul_rate:.0%})')
  print(f'  machine     other processes used {others:.2f} CPUs while timing', flush=True)


def main(argv):
  del argv
  # Before JAX initialises its backend: XLA:CPU flags, dispatch and malloc
  # (see hardware/cpu_runtime.py).
  cpu_runtime.configure(low_memory=_LOW_MEMORY.value)
  if not _MATMUL_GFLOPS.value:
    # Parent: the matmul rate here, each config in its own process (its own peak RSS).
    rate = chips.matmul_flops_per_second()
    print(f'jax {jax.__version__}, {jax.default_backend()} x{jax.device_count()}, '
          f'{os.cpu_count()} CPUs; float32 2048^3 jnp.dot (best of 20): '
          f'{rate / 1e9:.1f} GFLOP/s; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
    for name in ['config'] if _CONFIG.value else _CONFIGS.value:
      flags_ = [a for a in sys.argv[1:] if not a.startswith(('--configs', '--matmul_gflops'))]
      subprocess.run([sys.executable, os.path.abspath(__file__), f'--configs={name}',
                      f'--matmul_gflops={rate / 1e9}', *flags_], check=True)
    return
  for name in ['config'] if _CONFIG.value else _CONFIGS.value:
    time_config(name, _MATMUL_GFLOPS.value * 1e9)


if __name__ == '__main__':
  app.run(main)
