"""Ahead-of-time compilation of the real train step for a Cloud TPU slice, on any host.

`python train.py --compile_only --topology=v5p-128 --config=...` builds the slice's devices from
libtpu (no TPU needed), the mesh and sharded abstract state the run would use, compiles the
jitted train step, and reports per device what it holds against the chip's HBM: parameters,
optimizer state, temporaries (activations and other scratch), plus FLOPs per step. Exit status
0 when it fits, 1 when it does not; config problems raise `ConfigError` (exit 2).
"""

import dataclasses
import math
import resource
import sys
import time

import jax

from hardware import chips, tpu_slices
from parallel import sharding
from tasks import base
from training import config_check
from training import state as state_lib
from training import step as step_lib


@dataclasses.dataclass
class Report:
  """What one device of the slice holds and does in a train step (bytes and FLOPs per device)."""
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  hbm_bytes: int
  param_count: int
  params_bytes: int
  opt_state_bytes: int
  # From the compiled program; None when the compiler gave up (out of memory).
  other_bytes: int | None = None  # the batch, step counters, loss statistics
  temp_bytes: int | None = None  # activations kept for the backward pass, gradients, scratch
  code_bytes: int | None = None
  compiled_flops: float = math.nan  # XLA's count for the per-device program
  model_flops: float = math.nan  # the model module's analytic count, global step / devices
  trace_seconds: float = math.nan  # tracing and lowering to StableHLO
  compile_seconds: float = math.nan  # the TPU compiler
  host_peak_rss_bytes: int = 0
  compiler_error: str = ''
  unsharded: tuple = ()  # parameters whose dimensions the mesh does not divide (kept whole)
  batch_shapes: str = ''  # the global batch, e.g. 'tokens 256x8193'

  @property
  def total_bytes(self) -> int | None:
    if self.temp_bytes is None:
      return None
    # Whole-step peak: XLA's temporaries are one block live alongside the state and batch.
    return (self.params_bytes + self.opt_state_bytes + self.other_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes is not None and self.total_bytes <= self.hbm_bytes

  @property
  def free_fraction(self) -> float:
    return 1 - self.total_bytes / self.hbm_bytes if self.total_bytes is not None else math.nan


def _slice_devices(topology_name: str) -> list:
  try:
    return tpu_slices.devices(topology_name)
  except (ValueError, ImportError) as e:
    raise config_check.ConfigError(f'--topology: {e}') from None


def _mesh(config, devices, overridden):
  num_processes = len({d.process_index for d in devices})
  resolved = config_check.validate(config, len(devices), num_processes,
                                   sharding.num_slices(devices), 'tpu', overridden)
  try:
    return sharding.make_mesh(config.mesh, devices), resolved
  except ValueError as e:
    raise config_check.ConfigError(str(e)) from None


def _bytes_per_device(abstract_tree) -> int:
  """Bytes of one device's shard of every array in a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def _compile(config, mesh, setup, batch, report):
  """The compiled train step, or None with the compiler's out-of-memory message in `report`."""
  start = time.perf_counter()
  with sharding.activate(mesh, config.mesh.rules):
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    lowered = train_step.lower(setup.abstract_state, batch)
  report.trace_seconds = time.perf_counter() - start
  start = time.perf_counter()
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    report.compiler_error = str(e).strip().splitlines()[0]
    return None
  finally:
    report.compile_seconds = time.perf_counter() - start


def _compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', math.nan)) if cost else math.nan


def compile_report(config, topology_name: str, overridden=()) -> Report:
  """Compiles the train step for the named slice and measures it (see `Report`)."""
  devices = _slice_devices(topology_name)
  mesh, resolved = _mesh(config, devices, overridden)
  setup = state_lib.make_setup(config, mesh, resolved=resolved)
  state = setup.abstract_state
  batch = base.abstract_batch(setup.task.batch_spec('train'), mesh, config.mesh.rules)
  report = Report(
      topology=topology_name, device_kind=devices[0].device_kind, num_devices=len(devices),
      mesh=dict(mesh.shape), hbm_bytes=chips.hbm_bytes_per_device(devices[0]),
      param_count=state_lib.count_params(state['params']),
      params_bytes=_bytes_per_device(state['params']),
      opt_state_bytes=_bytes_per_device(state['opt_state']),
      model_flops=train_flops_per_step(config, setup.model_module) / len(devices),
      unsharded=tuple(sharding.unsharded_params(setup.param_template, mesh, config.mesh.rules)),
      batch_shapes=', '.join(f'{k} {"x".join(map(str, f.shape))}'
                             for k, f in setup.task.batch_spec('train').items()))
  compiled = _compile(config, mesh, setup, batch, report)
  report.host_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if compiled is not None:
    memory = compiled.memory_analysis()
    # Arguments are the state (donated: the outputs reuse its buffers) and the batch.
    report.other_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                          - memory.alias_size_in_bytes - report.params_bytes
                          - report.opt_state_bytes)
    report.temp_bytes = memory.temp_size_in_bytes
    report.code_bytes = memory.generated_code_size_in_bytes
    report.compiled_flops = _compiled_flops(compiled)
  return report


def train_flops_per_step(config, model_module) -> float:
  """Analytic FLOPs of one optimiser update on the global batch (all devices together);
  `model_module`: the config's (`Setup.model_module`)."""
  return (config.data.global_batch_size
          * model_module.train_flops_per_example(config.model, config))


def _size(n) -> str:
  """Bytes in a unit that shows them: 812.0 KiB, 37.5 MiB, 12.41 GiB."""
  if n is None:
    return '        ?    '
  for unit, scale, digits in (('GiB', 30, 2), ('MiB', 20, 1), ('KiB', 10, 1)):
    if n >= 1 << scale:
      return f'{n / 2**scale:9.{digits}f} {unit}'
  return f'{n:9d} B  '


def _count(n) -> str:
  return f'{n / 1e9:.2f} B' if n >= 1e9 else f'{n / 1e6:.2f} M'


def _micro(config) -> str:
  steps = config.train.grad_accum_steps
  return f' in {steps} micro-batches' if steps > 1 else ''


def format_report(r: Report, config) -> str:
  """The report as printed: one figure per line, per device."""
  mesh = ' '.join(f'{k}={v}' for k, v in r.mesh.items())
  share = lambda n: '' if n is None else f'  {n / r.hbm_bytes:6.1%}'
  lines = [
      f'{r.topology}: {r.num_devices} x {r.device_kind} ({r.hbm_bytes / 2**30:.0f} GiB HBM each),'
      f' mesh {mesh}',
      f'model {_count(r.param_count)} parameters, batch {r.batch_shapes}{_micro(config)}',
      f'traced in {r.trace_seconds:.1f} s, compiled in {r.compile_seconds:.1f} s, host peak RSS '
      f'{r.host_peak_rss_bytes / 2**30:.2f} GiB',
      'per device                         of HBM',
      f'  parameters           {_size(r.params_bytes)}{share(r.params_bytes)}',
      f'  optimizer state      {_size(r.opt_state_bytes)}{share(r.opt_state_bytes)}',
      f'  batch and counters   {_size(r.other_bytes)}{share(r.other_bytes)}',
      f'  temporaries          {_size(r.temp_bytes)}{share(r.temp_bytes)}',
      f'  program              {_size(r.code_bytes)}{share(r.code_bytes)}',
      f'  total                {_size(r.total_bytes)}{share(r.total_bytes)}'
      + (f'  ({r.free_fraction:.1%} free)' if r.total_bytes is not None else ''),
      f"FLOPs per step per device: {r.model_flops:.4g} analytic (the model module's count), "
      + ('compiled: none' if math.isnan(r.compiled_flops) else
         f"{r.compiled_flops:.4g} compiled (XLA's cost analysis: a scanned body counts once, "
         'Pallas kernels such as splash attention not at all)'),
  ]
  lines += [f'note: {line}' for line in r.unsharded]
  return '\n'.join(lines)


def run(config, topology_name: str, overridden=()) -> int:
  """Prints the report for `config` on the named slice; 0 if the step fits in HBM, else 1.
  `overridden`: the config keys set on the command line (config_check.validate)."""
  report = compile_report(config, topology_name, overridden)
  print(format_report(report, config), flush=True)
  if report.fits:
    return 0
  sys.stderr.write(f'error: the train step does not fit {topology_name} '
                   f'({report.hbm_bytes / 2**30:.0f} GiB HBM per {report.device_kind}): '
                   f'{shortfall(report)}\n')
  return 1


def shortfall(r: Report) -> str:
  if r.total_bytes is not None:
    return f'it needs {r.total_bytes / 2**30:.2f} GiB per device'
  state = (r.params_bytes + r.opt_state_bytes) / 2**30
  return (f'parameters and optimizer state take {state:.2f} GiB per device, and the TPU '
          f'compiler ran out of memory: {r.compiler_error.rstrip(".")}')
