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


def make_optimizer(o, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(o, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask),
  )
