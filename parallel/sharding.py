"""The device mesh and the mapping from logical axis names to it.

Model code names logical axes only (`batch`, `embed`, `mlp`, ...); the config's rule table maps
them to the mesh axes `stage`, `data`, `fsdp` and `tensor`. Switching data parallel -> FSDP ->
FSDP x tensor -> pipeline stages is a change of mesh sizes, never of model code.
"""

import contextlib
import math

import jax
import ml_collections
from flax import linen
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# `stage` is outermost: across slices, pipeline stages talk over DCN (parallel/pipeline.py).
MESH_AXES = ('stage', 'data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Each mesh axis is used at most once per array: a later rule for an
# axis already taken leaves that dimension unsharded, which is how activations (batch over
# data+fsdp) and parameters (embed over fsdp) share one table. Names not listed stay unsharded.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('stage', 'stage'),  # the pipeline's stage axis (parallel/pipeline.py)
    # The stacked axis of scanned blocks: split into consecutive groups, one per pipeline stage
    # (with mesh.stage=1 each device holds every layer).
    ('layers', 'stage'),
    ('lora', None),  # LoRA adapters' rank axis: small, whole on every device
)


def mesh_config():
  mesh = ml_collections.ConfigDict()
  # Sizes within a slice (ICI); -1 fills in the devices the other axes leave.
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.stage = 1  # pipeline stages: the decoder's layers in consecutive groups (GPipe)
  # Sizes across slices (DCN) of a multi-slice job; an axis's full size is ici * dcn.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_tensor = 1
  mesh.dcn_stage = 1
  mesh.rules = RULES
  return mesh


def _resolve(sizes: dict[str, int], total: int, of_what: str) -> tuple[int, ...]:
  """Fills at most one `-1` so the sizes multiply to `total` (`total` `of_what`)."""
  known = math.prod(s for s in sizes.values() if s != -1)
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f'mesh: at most one of {sizes} may be -1')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'mesh: sizes must be positive or -1, got {sizes}')
  if total % known:
    raise ValueError(f'mesh: axis sizes {sizes} do not divide the {total} {of_what}')
  resolved = tuple(total // known if s == -1 else s for s in sizes.values())
  if math.prod(resolved) != total:
    raise ValueError(f'mesh: axis sizes {sizes} use {math.prod(resolved)} of the {total} '
                     f'{of_what}')
  return resolved


def ici_dcn_shapes(mesh_config, num_devices: int, num_slices: int = 1):
  """Per-axis sizes within a slice (ICI) and across slices (DCN), with -1 filled in."""
  dcn = _resolve({f'dcn_{a}': mesh_config[f'dcn_{a}'] for a in MESH_AXES}, num_slices,
                 'slices')
  ici = _resolve({a: mesh_config[a] for a in MESH_AXES}, num_devices // num_slices,
                 'devices' if num_slices == 1 else 'devices of each slice')
  return ici, dcn


def mesh_shape(mesh_config, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """The whole mesh's per-axis sizes: within-slice size times across-slice size."""
  ici, dcn = ici_dcn_shapes(mesh_config, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def num_slices(devices) -> int:
  """Slices joined over the data-centre network; devices without a slice index are one."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A mesh whose device order follows the physical topology, slice-major across slices."""
  devices = jax.devices() if devices is None else devices
  slices = num_slices(devices)
  ici, dcn = ici_dcn_shapes(mesh_config, len(devices), slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_spec(rules, *names) -> PartitionSpec:
  """The mesh PartitionSpec for an array whose dimensions have these logical names."""
  return linen.logical_to_mesh_axes(names, rules)


@contextlib.contextmanager
def activate(mesh, rules):
  """Context in which tracing resolves logical activation constraints on this mesh."""
  with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
    yield


def constrain(x, *names):
  """Shards an activation by logical axis names; a no-op outside `activate`."""
  return linen.with_logical_constraint(x, names)


def logical_sharding(mesh, rules, *names) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(rules, *names))


def _fitting_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
  """`spec` with the mesh axes dropped from any dimension they do not divide evenly."""
  return PartitionSpec(*(axes if dim % shards(mesh.shape, axes) == 0 else None
                         for dim, axes in zip(shape, tuple(spec) + (None,) * len(shape))))


def _axis_tuple(axes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def shards(mesh_sizes, axes) -> int:
  """How many ways a dimension is split over `axes` (None, 'fsdp' or ('data', 'fsdp')) of a
  mesh with these per-axis sizes (a Mesh's `.shape` or a dict)."""
  return math.prod(mesh_sizes[a] for a in _axis_tuple(axes))


def _rule_spec(variable, rules) -> PartitionSpec:
  names = variable.get_metadata().get('logical_axes')
  return PartitionSpec() if names is None else logical_spec(rules, *names)


def param_shardings(abstract_params: nnx.State, mesh, rules):
  """NamedSharding for each Variable in `abstract_params`, from its `logical_axes` metadata.

  A dimension its mesh axes do not divide (a vocabulary of 50257 over 4 ways) stays whole;
  `unsharded_params` lists those.
  """
  def sharding(variable):
    return NamedSharding(mesh, _fitting_spec(_rule_spec(variable, rules), variable.shape, mesh))

  return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unsharded_params(abstract_params: nnx.State, mesh, rules) -> list[str]:
  """One line per parameter dimension the rules shard but the mesh cannot divide evenly."""
  lines = []
  for path, variable in nnx.to_flat_state(abstract_params):
    wanted = _rule_spec(variable, rules)
    got = _fitting_spec(wanted, variable.shape, mesh)
    for dim, (want, have) in enumerate(zip(wanted, got)):
      if want != have:
        ways = shards(mesh.shape, want)
        size = variable.size * variable.dtype.itemsize
        lines.append(f'{".".join(map(str, path))} dimension {dim} ({variable.shape[dim]}) is '
                     f'not divisible by {"x".join(_axis_tuple(want))}={ways}: kept whole, '
                     f'{size / 2**20:.2f} MiB on each of those devices')
  return lines


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())

