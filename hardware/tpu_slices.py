"""Cloud TPU slice names (`v5p-128`, `v5e-16`, `2xv6e-8`) -> compile-only devices of that slice.

Cloud TPU counts v4 and v5p slices in TensorCores, two per chip (v5p-128 is 64 chips), and v5e
and v6e slices in chips (v6e-8 is 8 chips). `devices(name)` asks libtpu, through
`jax.experimental.topologies`, for the slice's devices laid out as the real chips are, so a CPU
host can compile for it. `Nx<slice>` is N slices joined over the data-center network.
"""

import dataclasses
import importlib.util
import os
import re

from hardware import console, cpu_runtime

# Chips -> physical layout, as Cloud TPU builds each slice size.
_CUBE = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
         256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16',
         6144: '16x16x24'}
_PLANE = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
          256: '16x16'}


@dataclasses.dataclass(frozen=True)
class Generation:
  libtpu_name: str  # what libtpu's topology names call it
  cores_per_chip: int  # in the Cloud TPU slice name's count
  layouts: dict
  largest: int  # largest slice, in chips
  options: tuple = ()  # extra get_topology_desc arguments


_GENERATIONS = {
    # One JAX device per chip: v4's two TensorCores run as one "megacore" device, as on Cloud TPU.
    'v4': Generation('v4', 2, _CUBE, 2048, (('chip_config_name', 'megacore'),)),
    'v5p': Generation('v5p', 2, _CUBE, 6144),
    'v5e': Generation('v5e', 1, _PLANE, 256),
    'v6e': Generation('v6e', 1, _PLANE, 256),
}
_ALIASES = {'v5litepod': 'v5e'}
_NAME = re.compile(r'^(?:(\d+)x)?([a-z0-9]+)-(\d+)$')


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  topology: str  # libtpu's name, e.g. 'v5p:4x4x4'
  chips: int  # per slice
  num_slices: int
  options: dict  # get_topology_desc keyword arguments

  @property
  def num_devices(self) -> int:
    return self.chips * self.num_slices


def supported() -> str:
  """The accepted names, in one line."""
  def sizes(name, gen):
    counts = [c * gen.cores_per_chip for c in gen.layouts if c <= gen.largest]
    return f'{name}-{{{",".join(map(str, counts))}}}'
  slices = [sizes(name, gen) for name, gen in _GENERATIONS.items()]
  return f'{"; ".join(slices)} (v5litepod-N = v5e-N); Nx<slice> for N slices, e.g. 2xv5e-16'


def parse(name: str) -> Slice:
  """The slice a Cloud TPU name describes; ValueError listing the supported names if unknown."""
  match = _NAME.match(name.strip().lower())
  generation = match and _GENERATIONS.get(_ALIASES.get(match[2], match[2]))
  count = int(match[3]) if match else 0
  chips = count // generation.cores_per_chip if generation else 0
  if (not generation or count % generation.cores_per_chip or chips not in generation.layouts
      or chips > generation.largest or (match[1] and int(match[1]) < 1)):
    raise ValueError(f'unknown TPU topology {name!r}; supported: {supported()}')
  num_slices = int(match[1] or 1)
  options = dict(generation.options, chips_per_host_bounds=_host_bounds(generation, chips))
  if num_slices > 1:
    options['num_slices'] = num_slices
  topology = f'{generation.libtpu_name}:{generation.layouts[chips]}'
  return Slice(name, topology, chips, num_slices, options)


def _host_bounds(generation: Generation, chips: int) -> tuple[int, int, int]:
  """Chips per host VM: 4 (2x2), except single-host v5e/v6e slices of 1 or 8 chips."""
  if generation.layouts is _PLANE and chips in (1, 8):
    return (1, 1, 1) if chips == 1 else (2, 4, 1)
  return (2, 2, 1)


def devices(name: str) -> list:
  """Compile-only devices of the named slice(s). Needs libtpu (`pip install -e '.[tpu]'`);
  ImportError without it."""
  if importlib.util.find_spec('libtpu') is None:
    raise ImportError(f'compiling for a TPU topology needs {console.install_hint("libtpu", "tpu")}')
  if not cpu_runtime.tpu_chips_present():
    # The first process to load libtpu takes /tmp/libtpu_lockfile, which guards the chips and
    # makes any other fail; with no chips here, compile-only processes may run side by side.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  tpu_slice = parse(name)
  return topologies.get_topology_desc(tpu_slice.topology, 'tpu', **tpu_slice.options).devices
