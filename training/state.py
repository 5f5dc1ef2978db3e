"""Train state: built already sharded over the mesh, never whole on one device.

The state is a plain pytree of arrays: `step`, `params`, `opt_state`, the guard's counters and,
for models that have any, `model_state` (e.g. BatchNorm's running statistics). The model's graph
definition is split off once, so the compiled step only ever sees arrays.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import lora, platforms
from parallel import sharding
from tasks import base
from training import config_check, local_sgd, optimizer, precision, warm_start

TrainState = dict  # {'step', 'params', ['model_state',] 'opt_state', 'skipped_steps', 'loss_stats',
#                     ['loss_scale']}; with local SGD {'step', 'params', 'opt_state' (the outer
#                     optimiser's), 'skipped_steps', 'local' (each replica's; local_sgd.py)}
MODEL_STATE = nnx.BatchStat  # model variables that are not trained by the optimizer


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run's state: how to rebuild the model and where arrays live."""
  graphdef: nnx.GraphDef
  param_template: nnx.State  # abstract params with their Variable types and logical axes
  model_state_template: nnx.State  # abstract non-trained variables (may be empty)
  task: base.Task
  model_module: types.ModuleType  # config.model.name's module (models/__init__.py)
  tx: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: TrainState
  frozen: dict | None = None  # bools over the params: those never updated (no gradient taken)
  outer_tx: optax.GradientTransformation | None = None  # local SGD's outer optimiser, or None

  def model(self, params, model_state=None) -> nnx.Module:
    """The model holding `params` (and `model_state`), pure dicts; used while tracing."""
    templates = [jax.tree.map(lambda v: v, t)
                 for t in (self.param_template, self.model_state_template)]
    nnx.replace_by_pure_dict(templates[0], params)
    if model_state is not None:
      nnx.replace_by_pure_dict(templates[1], model_state)
    return nnx.merge(self.graphdef, *templates)

  @staticmethod
  def model_state(model) -> dict | None:
    """The model's non-trained variables as a pure dict, or None if it has none."""
    state = nnx.to_pure_dict(nnx.state(model, MODEL_STATE))
    return state or None


def _new_model(config, model_module, platform=None):
  """The model for `platform` (default: JAX's backend); initial parameters never depend on it."""
  model_config = platforms.resolve_for_platform(lora.model_config(config.model, config.finetune),
                                                platform or jax.default_backend())
  return model_module.Model(model_config, rngs=nnx.Rngs(params=config.seed))


def _to_dict(state):
  """nnx.State -> nested dicts, keeping whatever leaves it holds (here: shardings)."""
  return {k: _to_dict(v) if isinstance(v, (nnx.State, dict)) else v for k, v in state.items()}


def _initial_state(config, model_module, tx) -> TrainState:
  model = _new_model(config, model_module)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  model_state = Setup.model_state(model)
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      **({'model_state': model_state} if model_state else {}),
      'opt_state': tx.init(params),
      'skipped_steps': jnp.zeros((), jnp.int32),  # updates rejected by the step's guard
      'loss_stats': {'mean': jnp.zeros(()), 'var': jnp.zeros(()),  # for spike detection
                     'count': jnp.zeros((), jnp.int32)},
      **({'loss_scale': precision.initial_state(config.train)}
         if precision.enabled(config) else {}),
  }


def _backbone(config, param_template) -> tuple[dict | None, float]:
  """(the backbone, a tree of bools over the params, or None; its learning rate scale, 0:
  frozen). With LoRA the backbone is frozen, its adapters are not part of it."""
  f, params = config.finetune, nnx.to_pure_dict(param_template)
  if f.lora_rank:
    backbone = (warm_start.backbone(config.init_from, params) if config.init_from
                else jax.tree.map(lambda _: True, params))
    is_adapter = lambda path, _: getattr(path[-1], 'key', None) in lora.ADAPTERS
    adapters = jax.tree_util.tree_map_with_path(is_adapter, params)
    return jax.tree.map(lambda b, a: b and not a, backbone, adapters), 0.0
  if config.init_from and (f.freeze_backbone or f.backbone_lr_scale != 1.0):
    backbone = warm_start.backbone(config.init_from, params)
    return backbone, 0.0 if f.freeze_backbone else f.backbone_lr_scale
  return None, 1.0


def make_setup(config, mesh, platform: str = '',
               resolved: config_check.Resolved | None = None) -> Setup:
  """The model is built for `platform`, by default the mesh's: an AOT mesh of TPU devices gets
  the TPU model. `resolved`: the config's choices as validation made them (default: looked up
  here, for callers that skip validation)."""
  platform = platform or platforms.mesh_platform(mesh)
  resolved = resolved or config_check.resolve(config)
  graphdef, param_template, model_state_template = nnx.split(
      nnx.eval_shape(lambda: _new_model(config, resolved.model, platform)), nnx.Param,
      MODEL_STATE)
  backbone, backbone_lr_scale = _backbone(config, param_template)
  tx = optimizer.make_optimizer(config.optim, config.train.steps, backbone, backbone_lr_scale)
  abstract = jax.eval_shape(lambda: _initial_state(config, resolved.model, tx))
  replicated = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  for key, template in (('params', param_template), ('model_state', model_state_template)):
    if key in abstract:
      shardings[key] = _to_dict(sharding.param_shardings(template, mesh, config.mesh.rules))
  opt_state_shardings = functools.partial(_opt_state_shardings, param_shardings=shardings[
      'params'], abstract_params=abstract['params'], replicated=replicated)
  shardings['opt_state'] = opt_state_shardings(tx, abstract['opt_state'])
  outer_tx = None
  if config.train.sync_every > 1:
    if 'model_state' in abstract:
      raise config_check.ConfigError(
          f'train.sync_every: local SGD keeps no model state, and model.name='
          f'{config.model.name!r} has some (BatchNorm statistics); use sync_every=1')
    outer_tx = local_sgd.outer_optimizer(config.optim.outer)
    abstract, shardings = local_sgd.layout(abstract, shardings, outer_tx, opt_state_shardings,
                                           mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Setup(graphdef, param_template, model_state_template, resolved.task, resolved.model, tx,
               abstract, shardings, backbone if backbone_lr_scale == 0 else None, outer_tx)


def _opt_state_shardings(tx, abstract_opt_state, *, param_shardings, abstract_params,
                         replicated):
  """A parameter's state is sharded like it when shaped like it. Other state derived from a
  parameter is small and replicated: Adafactor's factored moments (a row and a column vector).
  Where a partitioned optimizer (Muon) keeps no state for a parameter, its state tree has an
  empty MaskedNode, kept as it is."""
  masked = optax.transforms.MaskedNode

  def state_sharding(state, param_sharding, param):
    if isinstance(state, masked):
      return state
    return param_sharding if state.shape == param.shape else replicated
  return optax.tree_map_params(
      tx, state_sharding, abstract_opt_state, param_shardings, abstract_params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, masked, jax.ShapeDtypeStruct)))


def init_state(config, setup: Setup) -> TrainState:
  """Fresh state, each array initialised directly in its shard."""
  def initial():
    state = _initial_state(config, setup.model_module, setup.tx)
    if setup.outer_tx is None:
      return state
    replicas = jax.tree.leaves(setup.abstract_state['local'])[0].shape[0]
    return local_sgd.initial_state(state, setup.outer_tx, replicas)
  return jax.jit(initial, out_shardings=setup.shardings)()


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
