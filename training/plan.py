"""Turns free HBM into speed: `python train.py --compile_only --plan --topology=T --config=...`.

Tries the memory levers the config already has, for that Cloud TPU slice: `model.remat` (none,
dots, names, full: least recompute first), `train.grad_accum_steps` (micro-batches), the mesh
within a slice (`mesh.data/fsdp/tensor`) and `model.loss_chunk`. For each remat policy and mesh
an analytic estimate picks the fewest micro-batches (and a loss chunk only if needed) that should
fit; the most promising `max_compiles` candidates are compiled (training/aot.py) and ranked.

Step-time model (for ranking, not a forecast): max(compiled FLOPs / the chip's peak FLOP/s,
collective bytes / the chip's ICI bandwidth). It assumes the chip computes at peak and overlaps
communication perfectly with it, so it rewards less recompute and fewer bytes gathered, and is
blind to HBM bandwidth, kernel efficiency and the latency of many small collectives.
"""

import copy
import dataclasses
import math
import time

import jax

from hardware import chips
from parallel import sharding
from training import aot
from training import config_check
from training import state as state_lib

REMATS = ('none', 'dots', 'names', 'full')  # least recompute first
MAX_COMPILES = 2  # llama3_8b on v5p-128: about 2 minutes each on an idle 2-core host
_FITS = 0.9  # the share of HBM an estimate may fill and count as fitting (it misses scratch)
_LOSS_CHUNK = 1024  # tried when the config computes all logits at once and that is too big
_MESH_LEVERS = ('data', 'fsdp', 'tensor')  # the mesh axes tried; `stage` stays as configured


@dataclasses.dataclass
class Candidate:
  overrides: dict  # config key -> value, every lever
  estimate_bytes: float  # per device, analytic
  report: aot.Report | None = None

  @property
  def fits(self) -> bool:
    return self.report.fits if self.report else False

  def step_seconds(self, chip) -> float:
    """The module docstring's model; NaN until compiled."""
    if not self.report or self.report.temp_bytes is None:
      return math.nan
    return max(self.report.compiled_flops / chip.peak_flops,
               self.report.collective_bytes / chip.ici_bytes_per_second)


def with_overrides(config, overrides: dict):
  """A copy of `config` with `{'model.remat': 'none', ...}` applied."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in overrides.items():
      section, name = key.rsplit('.', 1)
      config[section][name] = value
  return config


def _ici_sizes(config, num_devices: int, num_slices: int) -> dict[str, int]:
  return dict(zip(sharding.MESH_AXES,
                  sharding.ici_dcn_shapes(config.mesh, num_devices, num_slices)[0]))


def _meshes(config, num_devices: int, num_slices: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) within a slice: the config's first, then fully sharded, tensor
  parallel 2 and 4, and two data-parallel replicas (each stage's, with pipeline stages)."""
  ici = _ici_sizes(config, num_devices, num_slices)
  n = num_devices // num_slices // ici['stage']
  options = [tuple(ici[a] for a in _MESH_LEVERS), (1, n, 1), (1, n // 2, 2), (1, n // 4, 4),
             (2, n // 2, 1)]
  return [m for i, m in enumerate(options) if math.prod(m) == n and m not in options[:i]]


def _activation_bytes(config, remat: str, micro: int, loss_chunk: int, batch_shards: int):
  """Per device: what the backward pass keeps of each layer for `remat`, one layer's full set
  (rematerialised while its gradient is taken) and the logits of one loss chunk."""
  m = config.model
  d, f, kv = m.embed_dim, m.mlp_dim, 2 * m.num_kv_heads * (m.embed_dim // m.num_heads)
  up = (2 if m.mlp == 'swiglu' else 1) * f
  named = {'query_proj': d, 'key_proj': kv // 2, 'value_proj': kv // 2, 'attention_context': d,
           'attention_out': d, 'mlp_hidden': f, 'mlp_out': d}
  dots = d + d + kv + d + up + d  # block input, q, k and v, attention out, up (and gate), down
  # + norms, attention context, residual and activation, kept in float32: llama3_8b without
  # remat compiles to ~39 d per token and layer on v5p-128, this says 34 d.
  everything = dots + 2 * (4 * d + 2 * f)
  kept = {'full': d, 'names': d + sum(named[n] for n in m.remat_names), 'dots': dots,
          'none': everything}[remat]
  sequences = config.data.global_batch_size / (batch_shards * micro)
  tokens = sequences * config.data.seq_len
  item = 4 if m.dtype == 'float32' else 2
  layers = tokens * item * (m.num_layers * kept + (everything if remat != 'none' else 0))
  logits = 3 * 4 * sequences * (loss_chunk or config.data.seq_len) * m.vocab_size
  return layers + logits


def _estimate(config, state_bytes: float, params_bytes: float, num_slices: int) -> float:
  """Per-device bytes: the sharded state, its gradients (twice with micro-batches: one sum)
  and `_activation_bytes`."""
  data, fsdp, tensor = (config.mesh[a] for a in _MESH_LEVERS)
  micro = config.train.grad_accum_steps
  return ((state_bytes + params_bytes * (2 if micro > 1 else 1)) / (fsdp * tensor)
          + _activation_bytes(config, config.model.remat, micro, config.model.loss_chunk,
                              data * fsdp * num_slices))


def _candidates(config, devices, state_bytes, params_bytes, hbm, remats, overridden):
  """The best-estimated setting of each (mesh, remat): the fewest micro-batches, then a chunked
  loss, that the estimate says fit; else the most frugal one, which the estimate says does not."""
  chunks = [config.model.loss_chunk]
  if not config.model.loss_chunk and config.data.seq_len % _LOSS_CHUNK == 0:
    chunks.append(_LOSS_CHUNK)
  micros = [2**i for i in range(8) if config.data.global_batch_size % 2**i == 0]
  slices = sharding.num_slices(devices)
  processes = len({d.process_index for d in devices})
  found = []
  for data, fsdp, tensor in _meshes(config, len(devices), slices):
    for remat in remats:
      best = None
      for micro, chunk in ((m, c) for m in micros for c in chunks):
        overrides = {'model.remat': remat, 'train.grad_accum_steps': micro, 'mesh.data': data,
                     'mesh.fsdp': fsdp, 'mesh.tensor': tensor, 'model.loss_chunk': chunk}
        candidate = with_overrides(config, overrides)
        try:
          config_check.validate(candidate, len(devices), processes, slices, 'tpu', overridden)
        except config_check.ConfigError:
          continue
        best = Candidate(overrides, _estimate(candidate, state_bytes, params_bytes, slices))
        if best.estimate_bytes <= _FITS * hbm:
          break
      if best:
        found.append(best)
  return found


def plan(config, topology: str, overridden=(), max_compiles: int = MAX_COMPILES,
         remats=REMATS) -> list[Candidate]:
  """Every candidate, best first: compiled ones that fit by estimated step time, then the rest.
  Compiles the `max_compiles` candidates with the least recompute, fewest micro-batches and the
  config's own mesh first, among those the estimate says fit (or the one closest to fitting)."""
  devices = aot.slice_devices(topology)
  chip = chips.chip_for(devices[0].device_kind)
  mesh, resolved = aot.mesh_for(config, devices, overridden)
  abstract = state_lib.make_setup(config, mesh, resolved=resolved).abstract_state
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  params_bytes = nbytes(abstract['params'])
  state_bytes = params_bytes + nbytes(abstract['opt_state'])
  candidates = _candidates(config, devices, state_bytes, params_bytes, chip.hbm_bytes, remats,
                           overridden)
  own = _ici_sizes(config, len(devices), sharding.num_slices(devices))
  own_mesh = tuple(own[a] for a in _MESH_LEVERS)
  promise = lambda c: (c.estimate_bytes > _FITS * chip.hbm_bytes,
                       _mesh_of(c) != own_mesh, remats.index(c.overrides['model.remat']),
                       c.overrides['train.grad_accum_steps'])
  candidates.sort(key=promise)
  chosen = [c for c in candidates if c.estimate_bytes <= _FITS * chip.hbm_bytes][:max_compiles]
  chosen = chosen or [min(candidates, key=lambda c: c.estimate_bytes)]  # the compiler's verdict
  for i, candidate in enumerate(chosen):
    start = time.perf_counter()
    candidate.report = aot.compile_report(with_overrides(config, candidate.overrides), topology,
                                          overridden)
    print(f'compiled {i + 1}/{len(chosen)}: {_levers(candidate)} in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
  rank = lambda c: (not c.fits, c.report is None, c.step_seconds(chip) if c.fits else 0,
                    c.report.compiled_flops if c.fits else 0, c.estimate_bytes)
  return sorted(candidates, key=rank)


def _mesh_of(candidate) -> tuple[int, int, int]:
  return tuple(candidate.overrides[f'mesh.{a}'] for a in _MESH_LEVERS)


def _levers(c: Candidate) -> str:
  o = c.overrides
  return (f"remat={o['model.remat']} micro={o['train.grad_accum_steps']} "
          f"mesh={'x'.join(map(str, _mesh_of(c)))} loss_chunk={o['model.loss_chunk']}")


def overrides_of(best: Candidate, config, topology: str) -> list[str]:
  """The `--config.*` flags that turn `config` into `best` (the levers it changes)."""
  devices = aot.slice_devices(topology)
  own = _ici_sizes(config, len(devices), sharding.num_slices(devices))
  flags = []
  for key, value in best.overrides.items():
    section, name = key.split('.')
    current = own[name] if section == 'mesh' else config[section][name]
    if value != current or (section == 'mesh' and
                            _mesh_of(best) != tuple(own[a] for a in _MESH_LEVERS)):
      flags.append(f'--config.{key}={value}')
  return flags


def format_plan(candidates: list[Candidate], config, topology: str) -> str:
  """The ranked table, and the overrides of the best."""
  chip = chips.chip_for(aot.slice_devices(topology)[0].device_kind)
  gib = lambda n: f'{n / 2**30:6.1f}'
  lines = [f'{topology}: {len(candidates)} candidates; per chip: {chip.hbm_bytes / 2**30:.0f} GiB'
           f' HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s, {chip.ici_bytes_per_second / 1e9:.0f}'
           ' GB/s ICI',
           ' #  remat  micro  data x fsdp x tensor  loss_chunk  HBM GiB (est)  hw/model FLOPs'
           '  collectives GiB  step s  verdict']
  for i, c in enumerate(candidates, 1):
    r, o = c.report, c.overrides
    compiled = r is not None and r.temp_bytes is not None
    verdict = ('fits' if c.fits else 'does not fit' if r else
               'not compiled' if c.estimate_bytes <= _FITS * chip.hbm_bytes else
               'does not fit (estimate)')
    figures = ('     -', '-', '-', '-')
    if compiled:
      figures = (gib(r.total_bytes), f'{r.compiled_flops / r.model_flops:.2f}',
                 f'{r.collective_bytes / 2**30:.1f}', f'{c.step_seconds(chip):.3g}')
    lines.append(
        f'{i:2d}  {o["model.remat"]:5s}  {o["train.grad_accum_steps"]:5d}  '
        f'{" x ".join(map(str, _mesh_of(c))):20s}  {o["model.loss_chunk"]:10d}  '
        f'{figures[0]} ({gib(c.estimate_bytes).strip()})  {figures[1]:>14s}  {figures[2]:>15s}'
        f'  {figures[3]:>6s}  {verdict}')
  lines.append('step s = max(compiled FLOPs / peak FLOP/s, collective bytes / ICI bandwidth); '
               '(est): the analytic estimate that picked what to compile')
  best = candidates[0]
  if best.fits:
    flags = overrides_of(best, config, topology)
    lines.append('best: ' + (' '.join(flags) if flags else 'the config as it is'))
  else:
    lines.append('no candidate fits')
  return '\n'.join(lines)


def run(config, topology: str, overridden=(), max_compiles: int = MAX_COMPILES) -> int:
  """Prints the plan; 0 if its best candidate fits, else 1."""
  candidates = plan(config, topology, overridden, max_compiles)
  print(format_plan(candidates, config, topology), flush=True)
  return 0 if candidates[0].fits else 1
