"""The Optax chain: gradient clipping -> the chosen optimiser, its learning rate injected from the
schedule (decay masked) -> reduce_on_plateau's multiplier, if chosen -> the backbone's scale.

Each choice is a name in `optim` (`name`, `schedule`, `grad_clip`); the tables below say which
keys each one reads, and `validate` rejects a changed key that the choices made do not read.
"""

import inspect

import jax
import jax.numpy as jnp
import optax

# name -> the Optax alias; its keyword arguments other than the learning rate are `optim.<name>`.
OPTIMIZERS = {
    'sgd': optax.sgd, 'adam': optax.adam, 'adamw': optax.adamw, 'adagrad': optax.adagrad,
    'adadelta': optax.adadelta, 'adamax': optax.adamax, 'rmsprop': optax.rmsprop,
    'lion': optax.lion, 'adafactor': optax.adafactor, 'lamb': optax.lamb,
    **({'muon': optax.contrib.muon} if hasattr(optax.contrib, 'muon') else {}),
}
# The aliases' own names for `weight_decay` and its mask, where they differ from adamw's.
_DECAY_ARGS = {'adafactor': ('weight_decay_rate', 'weight_decay_mask'),
               'adadelta': ('weight_decay', 'weight_decay_mask'),
               'muon': ('weight_decay', 'weight_decay_mask')}
# schedule -> the keys of `optim` it reads (besides learning_rate and warmup_steps).
SCHEDULE_KEYS = {
    'constant': (),
    'linear': ('final_lr_fraction',),
    'cosine': ('final_lr_fraction',),
    'exponential': ('decay_rate', 'decay_steps'),
    'inverse_time': ('inverse_time_b', 'inverse_time_power'),
    'step': ('step_boundaries', 'step_factors'),
    'polynomial': ('final_lr_fraction', 'polynomial_power'),
    'warmup_stable_decay': ('final_lr_fraction', 'decay_fraction'),
    'one_cycle': ('one_cycle_pct_start', 'one_cycle_div_factor', 'one_cycle_final_div_factor'),
    'cyclic': ('cycle_steps', 'cycle_min_fraction'),
    'reduce_on_plateau': ('plateau',),
}
SCHEDULES = tuple(SCHEDULE_KEYS)
CLIP_KEYS = {'global_norm': ('grad_clip_norm',), 'value': ('grad_clip_value',),
             'adaptive': ('grad_clip_factor',), 'none': ()}


def _decay(o, steps: int) -> optax.Schedule:
  """The schedule after warmup, as a function of steps since warmup ended (`steps` of them)."""
  lr, end, s = o.learning_rate, o.learning_rate * o.final_lr_fraction, o.schedule
  if s in ('constant', 'reduce_on_plateau'):  # the plateau's multiplier is applied apart
    return optax.constant_schedule(lr)
  if s == 'cosine':
    return optax.cosine_decay_schedule(lr, steps, alpha=o.final_lr_fraction)
  if s == 'linear':
    return optax.linear_schedule(lr, end, steps)
  if s == 'polynomial':
    return optax.polynomial_schedule(lr, end, o.polynomial_power, steps)
  if s == 'exponential':
    return optax.exponential_decay(lr, o.decay_steps, o.decay_rate)
  if s == 'inverse_time':
    return lambda t: lr / (1.0 + o.inverse_time_b * t) ** o.inverse_time_power
  if s == 'step':
    scales = {}  # boundaries that round to one step multiply together
    for fraction, factor in zip(o.step_boundaries, o.step_factors):
      scales[round(fraction * steps)] = scales.get(round(fraction * steps), 1.0) * factor
    return optax.piecewise_constant_schedule(lr, scales)
  if s == 'warmup_stable_decay':
    decay = max(round(o.decay_fraction * steps), 1)
    stable, decaying = optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)
    return optax.join_schedules([stable, decaying], [steps - decay])
  if s == 'one_cycle':
    return optax.cosine_onecycle_schedule(steps, lr, o.one_cycle_pct_start,
                                          o.one_cycle_div_factor, o.one_cycle_final_div_factor)
  if s == 'cyclic':
    return _triangular(lr, lr * o.cycle_min_fraction, o.cycle_steps)
  raise ValueError(f'optim.schedule: unknown {s!r}; choose from {", ".join(SCHEDULES)}')


def _triangular(high, low, period):
  """Down from `high` (where warmup left it) to `low` in half a period, back up in the other."""
  def schedule(t):
    phase = jnp.mod(t, period) / period
    return low + (high - low) * jnp.abs(2.0 * phase - 1.0)
  return schedule


def learning_rate_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then the configured decay."""
  warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  return optax.join_schedules([warmup, _decay(o, max(total_steps - o.warmup_steps, 1))],
                              [o.warmup_steps])


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


def optimizer_kwargs(o) -> dict:
  """The alias's keyword arguments from `optim.<name>`, with the decay mask where it decays."""
  kwargs = o[o.name].to_dict()
  if 'weight_decay' in kwargs:
    rate, mask = _DECAY_ARGS.get(o.name, ('weight_decay', 'mask'))
    kwargs[rate] = kwargs.pop('weight_decay')
    kwargs[mask] = decay_mask
  if kwargs.get('momentum') == 0:
    kwargs['momentum'] = None  # no momentum buffer in the optimizer state
  if o.name == 'muon':
    kwargs['muon_weight_dimension_numbers'] = _muon_matrices
  return kwargs


def injected(name: str, kwargs: dict):
  """The alias under `optax.inject_hyperparams`, so its state records the learning rate of each
  update. Integers, flags, dtypes and masks stay static: traced, they would break the alias's
  Python control flow (e.g. Adafactor's `min_dim_size_to_factor`)."""
  alias = OPTIMIZERS[name]
  bound = inspect.signature(alias).bind(learning_rate=None, **kwargs)
  bound.apply_defaults()
  static = [k for k, v in bound.arguments.items() if k != 'learning_rate' and
            (callable(v) or (isinstance(v, int) and not isinstance(v, bool)))]
  return optax.inject_hyperparams(alias, static_args=static)


def _clipping(o) -> list[optax.GradientTransformation]:
  if o.grad_clip == 'global_norm':
    return [optax.clip_by_global_norm(o.grad_clip_norm)]
  if o.grad_clip == 'value':
    return [optax.clip(o.grad_clip_value)]
  if o.grad_clip == 'adaptive':
    return [optax.adaptive_grad_clip(o.grad_clip_factor)]
  return []


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
  those whose updates are scaled by `backbone_lr_scale` (0 freezes them)."""
  kwargs = optimizer_kwargs(o)
  parts = [*_clipping(o),
           injected(o.name, kwargs)(learning_rate=learning_rate_schedule(o, total_steps),
                                    **kwargs)]
  if o.schedule == 'reduce_on_plateau':  # held as state, so checkpoints keep it
    parts.append(optax.inject_hyperparams(_scale_by_multiplier)(lr_multiplier=1.0))
  if backbone is not None and backbone_lr_scale != 1.0:
    parts.append(optax.masked(optax.scale(backbone_lr_scale), backbone))
  return optax.chain(*parts)


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ValueError(f'optim.{key}: {message}')


def _leaves(value, default, key):
  """(key, value, default) for each plain value under `key` (sections are ConfigDicts)."""
  if hasattr(value, 'items'):
    for k, v in value.items():
      yield from _leaves(v, default[k], f'{key}.{k}')
  else:
    yield key, value, default


def _check_unread(o, defaults, choice: str, owners: dict, overridden):
  """Keys that only other choices of `optim.<choice>` read must keep their declared defaults.
  A config file tunes the keys of its own choice: switching the choice on the command line
  leaves those behind, and only then are they tolerated; set on the command line, never."""
  read = set(owners[o[choice]])
  choice_overridden = f'optim.{choice}' in overridden
  for owned in sorted({k for keys in owners.values() for k in keys} - read):
    for key, value, default in _leaves(o[owned], defaults[owned], owned):
      if f'optim.{key}' in overridden or (value != default and not choice_overridden):
        raise ValueError(f'optim.{key}: set to {value!r}, but optim.{choice}={o[choice]!r} does '
                         'not read it')


_UNIT_INTERVAL = ('b1', 'b2', 'beta', 'rho', 'decay', 'momentum', 'adam_b1', 'adam_b2')


def validate(o, steps: int, eval_every: int, defaults, overridden=()):
  """Raises ValueError('optim.<key>: ...') for the first key that cannot work. `defaults`: the
  declared `optim` section; `overridden`: the keys set on the command line ('optim.x.y')."""
  for choice, names in (('name', OPTIMIZERS), ('schedule', SCHEDULES), ('grad_clip', CLIP_KEYS)):
    _require(o[choice] in names, choice, f'{o[choice]!r} is not one of {", ".join(names)}')
  _check_unread(o, defaults, 'name', {n: (n,) for n in OPTIMIZERS}, overridden)
  _check_unread(o, defaults, 'schedule', SCHEDULE_KEYS, overridden)
  _check_unread(o, defaults, 'grad_clip', CLIP_KEYS, overridden)
  for key, value in o[o.name].items():
    if key in _UNIT_INTERVAL:
      _require(0 <= value < 1, f'{o.name}.{key}', f'must be in [0, 1), got {value}')
    elif isinstance(value, (int, float)):
      _require(value >= 0, f'{o.name}.{key}', f'must be >= 0, got {value}')
  _require(o.learning_rate > 0, 'learning_rate', f'must be > 0, got {o.learning_rate}')
  _require(0 <= o.warmup_steps < steps, 'warmup_steps',
           f'{o.warmup_steps} must be in [0, train.steps={steps})')
  for key in ('grad_clip_norm', 'grad_clip_value', 'grad_clip_factor'):
    _require(o[key] > 0, key, f'must be > 0, got {o[key]}')
  for key in ('l2_penalty', 'l1_penalty'):
    _require(o[key] >= 0, key, f'must be >= 0, got {o[key]}')
  _validate_schedule(o, eval_every)


def _validate_schedule(o, eval_every):
  unit = lambda key: _require(0 <= o[key] <= 1, key, f'must be in [0, 1], got {o[key]}')
  positive = lambda key: _require(o[key] > 0, key, f'must be > 0, got {o[key]}')
  unit('final_lr_fraction')
  s = o.schedule
  if s == 'exponential':
    positive('decay_rate')
    positive('decay_steps')
  elif s == 'inverse_time':
    _require(o.inverse_time_b >= 0 and o.inverse_time_power >= 0, 'inverse_time_b',
             'inverse_time_b and inverse_time_power must be >= 0')
  elif s == 'step':
    b, f = o.step_boundaries, o.step_factors
    _require(len(b) == len(f), 'step_factors', f'{len(f)} factors for {len(b)} boundaries')
    _require(all(0 < x < 1 for x in b) and list(b) == sorted(b), 'step_boundaries',
             f'{b} must be increasing fractions in (0, 1)')
    _require(all(x > 0 for x in f), 'step_factors', f'{f} must be > 0')
  elif s == 'polynomial':
    positive('polynomial_power')
  elif s == 'warmup_stable_decay':
    _require(0 < o.decay_fraction <= 1, 'decay_fraction', 'must be in (0, 1]')
  elif s == 'one_cycle':
    _require(0 < o.one_cycle_pct_start < 1, 'one_cycle_pct_start', 'must be in (0, 1)')
    positive('one_cycle_div_factor')
    positive('one_cycle_final_div_factor')
  elif s == 'cyclic':
    _require(o.cycle_steps >= 2, 'cycle_steps', f'must be >= 2, got {o.cycle_steps}')
    unit('cycle_min_fraction')
  elif s == 'reduce_on_plateau':
    p = o.plateau
    _require(p.metric and eval_every > 0, 'plateau.metric',
             f'{p.metric!r} needs evaluations (a metric name, and train.eval_every > 0)')
    _require(p.mode in ('min', 'max'), 'plateau.mode', f'{p.mode!r} is not one of min, max')
    _require(0 < p.factor < 1, 'plateau.factor', f'must be in (0, 1), got {p.factor}')
    for key in ('patience', 'cooldown', 'min_delta'):
      _require(p[key] >= 0, f'plateau.{key}', f'must be >= 0, got {p[key]}')
