"""Gradient health per layer: the numbers (computed in the train step) and the detector, which
the `GradientHealth` part (training/parts/gradient_health.py) runs.

A layer is a module path of the params tree (`blocks/layers/0/attention/query`): its Variables'
leaves (kernel, bias, ...) count together. A scanned stack (Variables whose first logical axis is
'layers') counts each layer of the stack separately, under the same name as when not scanned.

When `health.every` > 0 the step returns `health/norms`, a [3, layers] array: per layer the
gradient norm, the parameter norm (before the update) and the norm of the applied update. The
`GradientHealth` part turns every `health.every`-th of them into metrics and flags layers whose
gradients vanish (below `vanishing_fraction` x the median layer's) or explode (above
`exploding_factor` x the median, or `growth_factor` x what they were `window` checks before).
"""

import collections
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

STACKED_AXIS = 'layers'  # the logical axis of scanned blocks (models/layers.py)


def default_config():
  h = ml_collections.ConfigDict()
  # Every this many steps: per-layer gradient, parameter and update norms, and the vanishing /
  # exploding gradient detector (below). 0: off, and the step computes none of it.
  h.every = 0
  h.vanishing_fraction = 1e-4  # a layer whose grad norm is below this x the median's vanishes
  h.exploding_factor = 1e3  # ... above this x the median layer's explodes
  h.growth_factor = 100.0  # ... as does one grown this many times over the last `window` checks
  h.window = 5  # health checks remembered per layer (saved with checkpoints)
  return h


def _stacked(variable) -> bool:
  return (variable.get_metadata().get('logical_axes') or (None,))[0] == STACKED_AXIS


def _path_order(path):
  return [(isinstance(p, str), p) for p in path]  # list indices and names never compare


def layers(param_template: nnx.State) -> tuple[tuple[str, tuple], ...]:
  """(layer name, its leaves as (path, index in the stack or None)) for each layer, in path order.

  A scanned stack's layer index goes after the stack's module path (the longest path all its
  stacked leaves share), so a scanned model's layers are named as the unscanned model's.
  """
  flat = nnx.to_flat_state(param_template)
  stacked = [path[:-1] for path, variable in flat if _stacked(variable)]
  stack_depth = len(_common_prefix(stacked))
  groups = collections.defaultdict(list)
  for path, variable in flat:
    module = path[:-1] or path  # a Variable directly on the root module is a layer of its own
    if _stacked(variable):
      for i in range(variable.shape[0]):
        groups[(*module[:stack_depth], i, *module[stack_depth:])].append((path, i))
    else:
      groups[module].append((path, None))
  return tuple(('/'.join(map(str, name)), tuple(groups[name]))
               for name in sorted(groups, key=_path_order))


def _common_prefix(paths):
  prefix = paths[0] if paths else ()
  for path in paths:
    prefix = prefix[:len(list(itertools.takewhile(lambda ab: ab[0] == ab[1], zip(prefix, path))))]
  return prefix


def layer_norms(tree, layer_list) -> jax.Array:
  """The L2 norm of each layer's leaves of `tree` (params, grads or updates: a pure dict)."""
  flat = nnx.traversals.flatten_mapping(tree)
  stacked = {path for _, leaves in layer_list for path, i in leaves if i is not None}

  def squares(path):
    x = flat[path].astype(jnp.float32)
    # A stacked leaf gives one sum per layer of the stack: reduce all but the leading axis.
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)) if path in stacked else None)

  sums = {path: squares(path) for path in flat}
  return jnp.sqrt(jnp.stack([
      sum(sums[path] if i is None else sums[path][i] for path, i in leaves)
      for _, leaves in layer_list]))


class Detector:
  """Flags layers with vanishing or exploding gradient norms; keeps the last `window` checks."""

  def __init__(self, names, cfg):
    self.names, self.cfg = list(names), cfg
    self.history = {n: collections.deque(maxlen=cfg.window) for n in self.names}

  def check(self, grad_norms) -> tuple[list[str], list[str], float]:
    """(vanishing layers, exploding layers, the median layer's grad norm) for one check."""
    cfg, norms = self.cfg, np.asarray(grad_norms, np.float64)
    median = float(np.nanmedian(norms)) if np.isfinite(norms).any() else float('nan')
    vanishing, exploding = [], []
    relative = median > 0  # else most layers have no gradient: there is nothing to compare to
    for name, norm in zip(self.names, norms):
      past = self.history[name]
      # From zero (e.g. behind a zero-initialised layer at the start) is not growth.
      grown = len(past) == cfg.window and 0 < past[0] and norm > cfg.growth_factor * past[0]
      if not np.isfinite(norm) or grown or (relative and norm > cfg.exploding_factor * median):
        exploding.append(name)
      elif relative and norm < cfg.vanishing_fraction * median:
        vanishing.append(name)
      past.append(float(norm))
    return vanishing, exploding, median

  def state(self):
    return {n: list(h) for n, h in self.history.items()}

  def restore(self, saved):
    for name, norms in saved.items():
      if name in self.history:  # a layer the model no longer has is forgotten
        self.history[name].extend(norms)
