"""Train state: built already sharded over the mesh, never whole on one device.

The state is a plain pytree `{'step', 'params', 'opt_state'}` of arrays; the model's graph
definition is split off once, so the compiled step only ever sees arrays.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import MODELS
from models import platforms
from parallel import sharding
from training import optimizer

TrainState = dict  # {'step', 'params', 'opt_state', 'skipped_steps', 'loss_stats'}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run's state: how to rebuild the model and where arrays live."""
  graphdef: nnx.GraphDef
  param_template: nnx.State  # abstract params with their Variable types and logical axes
  tx: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: TrainState

  def model(self, params) -> nnx.Module:
    """The model holding `params` (a pure dict); used while tracing, so cheap enough."""
    template = jax.tree.map(lambda v: v, self.param_template)
    nnx.replace_by_pure_dict(template, params)
    return nnx.merge(self.graphdef, template)


def _new_model(config, platform=None):
  """The model for `platform` (default: JAX's backend); initial parameters never depend on it."""
  model_config = platforms.resolve_for_platform(config.model, platform or jax.default_backend())
  return MODELS[config.model.name](model_config, rngs=nnx.Rngs(params=config.seed))


def _to_dict(state):
  """nnx.State -> nested dicts, keeping whatever leaves it holds (here: shardings)."""
  return {k: _to_dict(v) if isinstance(v, (nnx.State, dict)) else v for k, v in state.items()}


def _initial_state(config, tx) -> TrainState:
  params = nnx.to_pure_dict(nnx.state(_new_model(config), nnx.Param))
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': tx.init(params),
      'skipped_steps': jnp.zeros((), jnp.int32),  # updates rejected by the step's guard
      'loss_stats': {'mean': jnp.zeros(()), 'var': jnp.zeros(()),  # for spike detection
                     'count': jnp.zeros((), jnp.int32)},
  }


def make_setup(config, mesh, platform: str = '') -> Setup:
  """The model is built for `platform`, by default the mesh's: an AOT mesh of TPU devices gets
  the TPU model."""
  platform = platform or platforms.mesh_platform(mesh)
  graphdef, param_template = nnx.split(nnx.eval_shape(lambda: _new_model(config, platform)),
                                       nnx.Param)
  tx = optimizer.make_optimizer(config.optim, config.train.steps)
  abstract = jax.eval_shape(lambda: _initial_state(config, tx))
  replicated = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  shardings['params'] = _to_dict(sharding.param_shardings(param_template, mesh,
                                                          config.mesh.rules))
  shardings['opt_state'] = optax.tree_map_params(
      tx, lambda _, s: s, abstract['opt_state'], shardings['params'],
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Setup(graphdef, param_template, tx, abstract, shardings)


def init_state(config, setup: Setup) -> TrainState:
  """Fresh state, each array initialised directly in its shard."""
  return jax.jit(lambda: _initial_state(config, setup.tx), out_shardings=setup.shardings)()


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
