"""The device mesh and the mapping from logical axis names to it.

Model code names logical axes only (`batch`, `embed`, `mlp`, ...); the config's rule table maps
them to the mesh axes `data`, `fsdp` and `tensor`. Switching data parallel -> FSDP -> FSDP x tensor
is a change of mesh sizes, never of model code.
"""

import contextlib
import math

import jax
from flax import linen
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the per-axis sizes, filling one `-1` with the remaining devices."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ValueError('mesh: at most one axis may be -1')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  if num_devices % known:
    raise ValueError(f'mesh: axis sizes {dict(zip(MESH_AXES, sizes))} do not divide the '
                     f'{num_devices} devices')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh: axis sizes {dict(zip(MESH_AXES, sizes))} use '
                     f'{math.prod(sizes)} of the {num_devices} devices')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


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


def param_shardings(abstract_params: nnx.State, mesh, rules):
  """NamedSharding for each Variable in `abstract_params`, from its `logical_axes` metadata."""

  def sharding(variable):
    names = variable.get_metadata().get('logical_axes')
    if names is None:
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_spec(rules, *names))

  return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())

