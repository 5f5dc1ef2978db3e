"""Ahead-of-time compilation of the real train step for a Cloud TPU slice, on any host.

`python train.py --compile_only --topology=v5p-128 --config=...` builds the slice's devices from
libtpu (no TPU needed), the mesh and sharded abstract state the run would use, compiles the
jitted train step, and reports per device what it holds against the chip's HBM: parameters,
optimizer state, temporaries (activations and other scratch), plus FLOPs per step. Exit status
0 when it fits, 1 when it does not; config problems raise `ConfigError` (exit 2).

The compiled FLOPs and collective bytes are counted in the optimised program's text (`hlo_cost`),
not taken from XLA's cost analysis, which counts a while loop's body once: a scanned model's 32
layers, gradient accumulation's micro-batches and a chunked loss would count as one each.
"""

import collections
import dataclasses
import functools
import math
import re
import resource
import sys
import time

import jax
import numpy as np

from hardware import chips, tpu_slices
from parallel import pipeline, sharding
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
  compiled_flops: float = math.nan  # the per-device program's (`hlo_cost`), what the chip does
  collective_bytes: float = math.nan  # all-gathers, reduce-scatters, all-reduces, ... (`hlo_cost`)
  model_flops: float = math.nan  # the model module's analytic count, global step / devices
  trace_seconds: float = math.nan  # tracing and lowering to StableHLO
  compile_seconds: float = math.nan  # the TPU compiler
  host_peak_rss_bytes: int = 0
  compiler_error: str = ''
  unsharded: tuple = ()  # parameters whose dimensions the mesh does not divide (kept whole)
  batch_shapes: str = ''  # the global batch, e.g. 'tokens 256x8193'
  microbatches: int = 0  # the pipeline schedule's, with mesh stages > 1

  @property
  def stages(self) -> int:
    return self.mesh.get('stage', 1)

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


def slice_devices(topology_name: str) -> list:
  try:
    return tpu_slices.devices(topology_name)
  except (ValueError, ImportError) as e:
    raise config_check.ConfigError(f'--topology: {e}') from None


def mesh_for(config, devices, overridden):
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


# --- counting the compiled program ---------------------------------------------------------

_ITEM_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'([a-z]\w*)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'(ENTRY\s+)?%([\w.-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s([a-z][\w-]*)\((.*)$')
_CALLEES = re.compile(r'\b(?:calls|body|condition|to_apply|true_computation|false_computation|'
                      r'branch_computations)=\{?(%[\w.-]+(?:, %[\w.-]+)*)')
_COLLECTIVES = {'all-gather', 'all-gather-start', 'reduce-scatter', 'all-reduce',
                'all-reduce-start', 'all-to-all', 'ragged-all-to-all', 'collective-permute',
                'collective-permute-start'}


@dataclasses.dataclass
class HloCost:
  """What one device's program does in one run, every loop body counted once per trip."""
  flops: float = 0.0  # matmuls and convolutions (elementwise work left out: a few percent)
  collective_bytes: float = 0.0  # the larger of each collective's input and output
  kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # runs

  def add(self, other: 'HloCost', times: int = 1):
    self.flops += times * other.flops
    self.collective_bytes += times * other.collective_bytes
    self.kernels.update({k: times * v for k, v in other.kernels.items()})


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(type_text)]


def _nbytes(arrays) -> int:
  return sum(_ITEM_BYTES.get(dtype, 4) * math.prod(shape) for dtype, shape in arrays)


def _dot_flops(out, lhs, attrs: str) -> int:
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs)[1]
  return 2 * math.prod(out) * math.prod(lhs[int(i)] for i in contracting.split(',') if i)


def _conv_flops(out, lhs, rhs, attrs: str) -> int:
  """2 x output batch x output features x input features per group x the (output, window)
  position pairs that read the input rather than its padding, as XLA counts them. TPU programs
  spell many matmuls as padded, dilated convolutions."""
  lhs_dims, rhs_dims, out_dims = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', attrs).groups()
  window = re.search(r'window=\{([^}]*)\}', attrs)
  window = dict(re.findall(r'(\w+)=([\dx_-]+)', window[1])) if window else {}
  def setting(key, d, default):
    return window[key].split('x')[d] if key in window else default
  flops = (2 * out[out_dims.index('b')] * out[out_dims.index('f')]
           * rhs[rhs_dims.index('i')])
  for d, label in enumerate(sorted(c for c in out_dims if c.isdigit())):
    stride, lhs_dilation, rhs_dilation = (int(setting(k, d, 1)) for k in
                                          ('stride', 'lhs_dilate', 'rhs_dilate'))
    low_pad = int(setting('pad', d, '0_0').split('_')[0])
    position = np.add.outer(np.arange(out[out_dims.index(label)]) * stride,
                            np.arange(rhs[rhs_dims.index(label)]) * rhs_dilation) - low_pad
    flops *= int(np.count_nonzero((position >= 0) & (position % lhs_dilation == 0)
                                  & (position // lhs_dilation < lhs[lhs_dims.index(label)])))
  return flops


def hlo_cost(hlo_text: str) -> HloCost:
  """FLOPs, collective bytes and Pallas kernel runs of an optimised HLO module's text, each loop
  body times its trip count (XLA's known_trip_count, else the `i < N` of the loop's condition,
  which is how JAX's scans and fori_loops count). Pallas kernels (`tpu_custom_call`) are opaque:
  counted by name, their FLOPs left to the caller."""
  computations, entry, shapes, constants = {}, None, {}, {}
  for line in hlo_text.splitlines():
    if header := _COMPUTATION.match(line):
      body = computations.setdefault(header[2], [])
      entry = header[2] if header[1] else entry
    elif (instruction := _INSTRUCTION.match(line)) and computations:
      name, type_text, opcode, rest = instruction.groups()
      operands = re.findall(r'%([\w.-]+)', rest.split(')')[0])
      shapes[name] = _arrays(type_text)
      if opcode == 'constant':
        constants[name] = rest.split(')')[0]
      body.append((name, opcode, operands, rest))

  def trip_count(attrs: str) -> int:
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs):
      return int(known[1])
    condition = re.search(r'condition=%([\w.-]+)', attrs)[1]
    for _, opcode, operands, rest in computations[condition]:
      bounds = [constants[o] for o in operands if constants.get(o, '').isdigit()]
      if opcode == 'compare' and 'direction=LT' in rest and bounds:
        return int(bounds[0])
    return 1

  @functools.cache
  def cost(computation: str) -> HloCost:
    total = HloCost()
    for name, opcode, operands, rest in computations[computation]:
      out = shapes[name]
      if opcode == 'dot':
        total.flops += _dot_flops(out[0][1], shapes[operands[0]][0][1], rest)
      elif opcode == 'convolution':
        total.flops += _conv_flops(out[0][1], shapes[operands[0]][0][1],
                                   shapes[operands[1]][0][1], rest)
      elif opcode in _COLLECTIVES:
        total.collective_bytes += max(max(_nbytes([a]) for a in out),
                                      sum(_nbytes(shapes[o]) for o in operands))
      elif opcode == 'custom-call' and '"tpu_custom_call"' in rest:
        total.kernels[name.split('.')[0]] += 1
      if opcode in ('async-update', 'async-done'):
        continue  # the same computation as its async-start, which counts it
      times = trip_count(rest) if opcode == 'while' else 1
      for callees in _CALLEES.findall(rest):
        for callee in re.findall(r'%([\w.-]+)', callees):
          total.add(cost(callee), times)
    return total

  return cost(entry)


def _attention_kernel_flops(config, model_module, kernels, num_devices) -> float:
  """The Pallas attention kernels' FLOPs (splash: XLA cannot see inside them): the model's
  analytic attention count, whose forward third is paid again for every extra forward kernel
  run per backward one (rematerialisation). 0 without such kernels, or for a model without
  `attention_flops_per_example`."""
  forward = sum(n for k, n in kernels.items() if 'mha_fwd' in k)
  backward = sum(n for k, n in kernels.items() if 'mha_dq' in k)
  per_example = getattr(model_module, 'attention_flops_per_example', None)
  if not forward or not backward or per_example is None:
    return 0.0
  attention = (config.data.global_batch_size * per_example(config.model, config)
               / num_devices)
  return attention * (forward / backward + 2) / 3


def compile_report(config, topology_name: str, overridden=()) -> Report:
  """Compiles the train step for the named slice and measures it (see `Report`)."""
  devices = slice_devices(topology_name)
  mesh, resolved = mesh_for(config, devices, overridden)
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
      microbatches=config.model.get('pipeline_microbatches', 0) or mesh.shape['stage'],
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
    cost = hlo_cost(compiled.as_text())
    report.compiled_flops = cost.flops + _attention_kernel_flops(
        config, setup.model_module, cost.kernels, len(devices))
    report.collective_bytes = cost.collective_bytes
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
         f'{r.compiled_flops:.4g} compiled ({r.compiled_flops / r.model_flops:.2f}x: the '
         "program's matmuls, loops counted per trip, Pallas attention from the analytic count)"),
  ]
  if not math.isnan(r.collective_bytes):
    lines.append(f'collectives per step per device: {_size(r.collective_bytes).strip()}')
  if r.stages > 1:
    lines += _pipeline_lines(r, config)
  lines += [f'note: {line}' for line in r.unsharded]
  return '\n'.join(lines)


def _pipeline_lines(r: Report, config) -> list[str]:
  """The GPipe schedule's bubble and the state each stage's devices hold together (each holds
  its own layers; the embeddings and the rest are on every stage)."""
  s, m = r.stages, r.microbatches
  devices = r.num_devices // s
  return [f'pipeline: {s} stages x {m} micro-batches (GPipe): bubble (S-1)/(M+S-1) = '
          f"{pipeline.bubble_fraction(s, m):.1%} of each stage's time",
          f'per stage ({config.model.num_layers // s} layers on {devices} devices): parameters '
          f'{_size(r.params_bytes * devices).strip()}, optimizer state '
          f'{_size(r.opt_state_bytes * devices).strip()}']


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
