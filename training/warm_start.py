"""`init_from`: start a run from another run's parameters (e.g. fine-tune a pretrained encoder).

Only parameters (and model state such as BatchNorm statistics) are taken: no optimizer state,
no step. A parameter that exists there with the same shape is loaded; one that does not exist
there (a new head) keeps its fresh initialisation; one whose shape differs is an error naming
it. The loaded parameters are the "backbone" that `finetune.freeze_backbone` and
`finetune.backbone_lr_scale` act on.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_LOADED = ('params', 'model_state')


class InitFromError(ValueError):
  """`init_from` names no usable checkpoint, or one whose parameters do not fit this model."""


def state_dir(path: str) -> epath.Path:
  """A workdir, its checkpoints/ (or best/) folder, or one step's folder -> the saved state."""
  p = epath.Path(path)
  if not p.is_dir():
    raise InitFromError(f'init_from: {path} is not a directory')
  if (p / 'checkpoints').is_dir():
    p = p / 'checkpoints'
  for item in ('state', 'default'):  # a train checkpoint, or the best one early stopping kept
    if (p / item / '_METADATA').exists():
      return p / item
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit())
  if not steps:
    raise InitFromError(f'init_from: no checkpoint in {path}')
  return state_dir(str(p / str(steps[-1])))


def _name(path) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _saved_shapes(directory: epath.Path) -> dict[str, tuple]:
  tree = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
  return {_name(path): tuple(m.shape) for path, m in jax.tree_util.tree_leaves_with_path(tree)
          if _name(path).split('.')[0] in _LOADED}


def backbone(init_from: str, abstract_params) -> dict:
  """The parameters `init_from` provides, as a tree of bools over `abstract_params`."""
  saved = _saved_shapes(state_dir(init_from))

  def provided(path, x):
    name = 'params.' + _name(path)
    if name in saved and saved[name] != tuple(x.shape):
      raise InitFromError(f'init_from: {name} is {saved[name]} in {init_from} and '
                       f'{tuple(x.shape)} here')
    return name in saved

  return jax.tree_util.tree_map_with_path(provided, abstract_params)


def load(init_from: str, state: dict) -> tuple[dict, int]:
  """`state` with the params and model state that `init_from` has; and how many it loaded."""
  directory = state_dir(init_from)
  checkpointer = ocp.StandardCheckpointer()
  on_one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one_device),
                        checkpointer.metadata(directory).item_metadata.tree)
  saved = {_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
      checkpointer.restore(directory, target))}
  loaded = 0
  out = dict(state)
  for key in _LOADED:
    if key not in state:
      continue

    def take(path, x, key=key):
      nonlocal loaded
      value = saved.get(f'{key}.{_name(path)}')
      if value is None:
        return x
      if value.shape != x.shape:
        raise InitFromError(f'init_from: {key}.{_name(path)} is {value.shape} in {init_from} and '
                         f'{x.shape} here')
      loaded += 1
      return jax.make_array_from_callback(x.shape, x.sharding,
                                          lambda index: value[index].astype(x.dtype))

    out[key] = jax.tree_util.tree_map_with_path(take, state[key])
  return out, loaded


def check(init_from: str, abstract_params):
  """InitFromError unless `init_from` holds a checkpoint whose parameters fit `abstract_params`:
  checked before a run writes anything."""
  try:
    backbone(init_from, abstract_params)
  except InitFromError:
    raise
  except Exception as e:  # pylint: disable=broad-except; whatever reading its metadata raised
    raise InitFromError(f'init_from: cannot read the checkpoint in {init_from}: '
                        f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}') from None
