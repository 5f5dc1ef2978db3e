"""The Optax chain: clip by global norm -> AdamW (decay masked) -> learning-rate schedule."""

import jax
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'exponential', 'inverse_time')


def _decay(o, decay_steps: int) -> optax.Schedule:
  """The schedule after warmup, as a function of steps since warmup ended."""
  lr, end = o.learning_rate, o.learning_rate * o.final_lr_fraction
  if o.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, max(decay_steps, 1), alpha=o.final_lr_fraction)
  if o.schedule == 'linear':
    return optax.linear_schedule(lr, end, max(decay_steps, 1))
  if o.schedule == 'constant':
    return optax.constant_schedule(lr)
  if o.schedule == 'exponential':
    return optax.exponential_decay(lr, o.decay_steps, o.decay_rate)
  if o.schedule == 'inverse_time':
    return lambda t: lr / (1.0 + o.inverse_time_b * t) ** o.inverse_time_power
  raise ValueError(f'optim.schedule: unknown {o.schedule!r}; choose from {", ".join(SCHEDULES)}')


def learning_rate_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then the configured decay."""
  warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  return optax.join_schedules([warmup, _decay(o, total_steps - o.warmup_steps)],
                              [o.warmup_steps])


def decay_mask(params):
  """Weight decay applies to matmul kernels only: not norms, biases or embeddings."""
  def is_kernel(path, _):
    return getattr(path[-1], 'key', None) == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(o, total_steps: int, backbone=None,
                   backbone_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """The optimizer state records the learning rate of each update (`inject_hyperparams`), so
  what is logged is what was used. `backbone` (a tree of bools over the parameters) marks
  those whose updates are scaled by `backbone_lr_scale` (0 freezes them)."""
  schedule = learning_rate_schedule(o, total_steps)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask',))
  parts = [optax.clip_by_global_norm(o.grad_clip_norm),
           adamw(learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                 weight_decay=o.weight_decay, mask=decay_mask)]
  if backbone is not None and backbone_lr_scale != 1.0:
    parts.append(optax.masked(optax.scale(backbone_lr_scale), backbone))
  return optax.chain(*parts)
