"""The Optax chain: gradient clipping -> the chosen optimiser, its learning rate injected from the
schedule (decay masked) -> reduce_on_plateau's multiplier, if chosen -> the backbone's scale.

Each choice is a name in `optim` (`name`, `schedule`, `grad_clip`) and a registry of entries
(data/choices.py): the optimisers and clipping here, the schedules in training/schedules.py. The
`optim` section, its checks and its comments come from them (`section`, `validate`).
"""

import inspect

import jax
import ml_collections
import optax

from data.choices import Key, Registry, require
from training.schedules import SCHEDULES

OPTIMIZERS = Registry('optim.name', 'the optimiser (its keys: optim.<name>)', own_sections=True)
CLIPPING = Registry('optim.grad_clip', 'gradient clipping')
_UNIT_INTERVAL = ('b1', 'b2', 'beta', 'rho', 'decay', 'momentum', 'adam_b1', 'adam_b2')


def decay_mask(params):
  """Weight decay applies to matmul kernels only: not norms, biases or embeddings."""
  def is_kernel(path, _):
    return getattr(path[-1], 'key', None) == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _muon_matrices(params):
  """Muon orthogonalises 2-D matmul kernels; embeddings, norms, biases and stacked (scanned)
  kernels take its AdamW instead."""
  dims = optax.contrib.MuonDimensionNumbers()
  return jax.tree.map(lambda kernel, p: dims if kernel and p.ndim == 2 else None,
                      decay_mask(params), params)


def _check_optimizer(o, **_):
  """Rates and betas in [0, 1), every other number >= 0."""
  for key, value in o[o.name].items():
    if key in _UNIT_INTERVAL:
      require(0 <= value < 1, f'{o.name}.{key}', f'must be in [0, 1), got {value}')
    elif isinstance(value, (int, float)):
      require(value >= 0, f'{o.name}.{key}', f'must be >= 0, got {value}')


def _alias(name, doc, alias, decay_args=('weight_decay', 'mask'), extra=None, **keys):
  """Registers the Optax `alias`; its keyword arguments but the learning rate are `optim.<name>`,
  weight decay (decoupled, masked off norms, biases and embeddings) under the alias's own names."""
  def build(kwargs):
    if 'weight_decay' in kwargs:
      kwargs[decay_args[0]] = kwargs.pop('weight_decay')
      kwargs[decay_args[1]] = decay_mask
    if kwargs.get('momentum') == 0:
      kwargs['momentum'] = None  # no momentum buffer in the optimizer state
    return alias, {**kwargs, **(extra or {})}
  OPTIMIZERS.register(name, doc, _check_optimizer, **keys)(build)


# Defaults are Optax's, but Adam's and AdamW's b2 and AdamW's decay suit LMs.
_alias('sgd', 'stochastic gradient descent', optax.sgd,
       momentum=Key(0.9, '0: plain SGD, no momentum buffer'), nesterov=False)
_alias('adam', 'Adam', optax.adam, b1=0.9, b2=0.95, eps=1e-8)
_alias('adamw', 'Adam with decoupled weight decay', optax.adamw, b1=0.9, b2=0.95, eps=1e-8,
       weight_decay=0.1)
_alias('adagrad', 'Adagrad', optax.adagrad, initial_accumulator_value=0.1, eps=1e-7)
_alias('adadelta', 'Adadelta', optax.adadelta, ('weight_decay', 'weight_decay_mask'), rho=0.9,
       eps=1e-6, weight_decay=0.0)
_alias('adamax', 'Adamax', optax.adamax, b1=0.9, b2=0.999, eps=1e-8)
_alias('rmsprop', 'RMSProp', optax.rmsprop, decay=0.9, eps=1e-8, centered=False, momentum=0.0,
       nesterov=False)
_alias('lion', 'Lion', optax.lion, b1=0.9, b2=0.99, weight_decay=1e-3)
_alias('adafactor', 'Adafactor', optax.adafactor, ('weight_decay_rate', 'weight_decay_mask'),
       decay_rate=0.8, clipping_threshold=1.0, multiply_by_parameter_scale=True,
       min_dim_size_to_factor=128, eps=1e-30, weight_decay=0.0)
_alias('lamb', 'LAMB', optax.lamb, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0)
if hasattr(optax.contrib, 'muon'):
  _alias('muon', 'Muon on 2-D matmul kernels, AdamW(adam_b1, adam_b2) on the rest',
         optax.contrib.muon, ('weight_decay', 'weight_decay_mask'),
         {'muon_weight_dimension_numbers': _muon_matrices}, beta=0.95, ns_steps=5, nesterov=True,
         eps=1e-8, weight_decay=0.0, adam_b1=0.9, adam_b2=0.999)


def _positive(key):
  """The check that `optim.<key>` is > 0."""
  return lambda o, **_: require(o[key] > 0, key, f'must be > 0, got {o[key]}')


@CLIPPING.register('global_norm', 'scales the gradients to a global norm of grad_clip_norm',
                   _positive('grad_clip_norm'),
                   grad_clip_norm=Key(1.0, 'the largest global gradient norm'))
def _global_norm(o):
  return [optax.clip_by_global_norm(o.grad_clip_norm)]


@CLIPPING.register('value', 'clips each element to +-grad_clip_value',
                   _positive('grad_clip_value'),
                   grad_clip_value=Key(1.0, 'the largest gradient element'))
def _value(o):
  return [optax.clip(o.grad_clip_value)]


@CLIPPING.register('adaptive', 'unit-wise, to grad_clip_factor x the parameter norm (Brock et '
                   'al. 2021)', _positive('grad_clip_factor'),
                   grad_clip_factor=Key(0.01, 'the largest gradient norm per unit of weight norm'))
def _adaptive(o):
  return [optax.adaptive_grad_clip(o.grad_clip_factor)]


@CLIPPING.register('none', 'no clipping')
def _no_clipping(o):
  del o
  return []


CHOICES = (OPTIMIZERS, SCHEDULES, CLIPPING)


def section() -> ml_collections.ConfigDict:
  """The `optim` section: each choice's name and every entry's keys at their defaults."""
  o = ml_collections.ConfigDict()
  OPTIMIZERS.declare(o, 'adamw')
  o.learning_rate = 3e-3  # the peak rate, reached after a linear warmup from 0
  o.warmup_steps = 50
  SCHEDULES.declare(o, 'cosine')
  CLIPPING.declare(o, 'global_norm')
  # Penalties added to the loss (coupled, unlike weight decay), on the kernels weight decay
  # applies to:
  o.l2_penalty = 0.0  # + l2_penalty / 2 * sum(w^2)
  o.l1_penalty = 0.0  # + l1_penalty * sum(|w|)
  # Local SGD's outer optimiser (train.sync_every > 1): SGD on the replicas' averaged deltas from
  # the global parameters, every sync_every steps. DiLoCo's: 0.7, Nesterov momentum 0.9.
  o.outer = ml_collections.ConfigDict()
  o.outer.learning_rate = 0.7  # 1 with momentum 0: the global parameters become the average
  o.outer.momentum = 0.9  # 0: no momentum buffer
  o.outer.nesterov = True
  return o


def learning_rate_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then the configured schedule."""
  warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  after = SCHEDULES[o.schedule].build(o, max(total_steps - o.warmup_steps, 1))
  return optax.join_schedules([warmup, after], [o.warmup_steps])


def injected(alias, kwargs: dict):
  """The alias under `optax.inject_hyperparams`, so its state records the learning rate of each
  update. Integers, flags, dtypes and masks stay static: traced, they would break the alias's
  Python control flow (e.g. Adafactor's `min_dim_size_to_factor`)."""
  bound = inspect.signature(alias).bind(learning_rate=None, **kwargs)
  bound.apply_defaults()
  static = [k for k, v in bound.arguments.items() if k != 'learning_rate' and
            (callable(v) or (isinstance(v, int) and not isinstance(v, bool)))]
  return optax.inject_hyperparams(alias, static_args=static)


def _scale_by_multiplier(lr_multiplier):
  """reduce_on_plateau's factor on every update; the loop lowers it between steps."""
  return optax.scale(lr_multiplier)


def lr_multiplier(opt_state):
  """reduce_on_plateau's multiplier (an array in the optimizer state), or None."""
  return optax.tree.get(opt_state, 'lr_multiplier')


def with_lr_multiplier(opt_state, value):
  return optax.tree.set(opt_state, lr_multiplier=value)


def make_optimizer(o, total_steps: int, backbone=None,
                   backbone_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """The optimizer state records the learning rate of each update (`inject_hyperparams`), so
  what is logged is what was used. `backbone` (a tree of bools over the parameters) marks
  those whose updates are scaled by `backbone_lr_scale`; 0 freezes them: no updates and no
  optimizer state (the clipping and the moments see the trained parameters only)."""
  alias, kwargs = OPTIMIZERS[o.name].build(o[o.name].to_dict())
  parts = [*CLIPPING[o.grad_clip].build(o),
           injected(alias, kwargs)(learning_rate=learning_rate_schedule(o, total_steps),
                                   **kwargs)]
  if o.schedule == 'reduce_on_plateau':  # held as state, so checkpoints keep it
    parts.append(optax.inject_hyperparams(_scale_by_multiplier)(lr_multiplier=1.0))
  if backbone is not None and backbone_lr_scale == 0:
    labels = jax.tree.map(lambda frozen: 'frozen' if frozen else 'trained', backbone)
    return optax.multi_transform({'trained': optax.chain(*parts),
                                  'frozen': optax.set_to_zero()}, labels)
  if backbone is not None and backbone_lr_scale != 1.0:
    parts.append(optax.masked(optax.scale(backbone_lr_scale), backbone))
  return optax.chain(*parts)


def keep_chosen(o, overridden=()):
  """The `optim` section with only the chosen entries' keys, after the errors for a key that
  they do not read (`overridden`: the keys set on the command line, 'optim.sgd.momentum')."""
  for choice in CHOICES:
    choice.check(o, overridden)
    o = choice.keep_chosen(o)
  return o


def validate(o, steps: int, eval_every: int):
  """Raises ValueError('optim.<key>: ...') for the first key of a resolved section that cannot
  work."""
  for choice in CHOICES:
    choice.validate(o, eval_every=eval_every)
  _require(o.learning_rate > 0, 'learning_rate', f'must be > 0, got {o.learning_rate}')
  _require(0 <= o.warmup_steps < steps, 'warmup_steps',
           f'{o.warmup_steps} must be in [0, train.steps={steps})')
  for key in ('l2_penalty', 'l1_penalty'):
    _require(o[key] >= 0, key, f'must be >= 0, got {o[key]}')


def _require(ok: bool, key: str, message: str):
  require(ok, f'optim.{key}', message)
