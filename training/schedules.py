"""Learning-rate schedules after the warmup (`optim.schedule`), one registered entry each.

An entry's build takes the `optim` section and the number of steps after warmup, and returns
the rate as a function of the steps since warmup ended. A new schedule is one `register` here.
"""

import jax.numpy as jnp
import optax

from data.choices import Key, Registry, require

SCHEDULES = Registry('optim.schedule', 'the learning rate after warmup')
_END = Key(0.1, 'the rate ends at learning_rate * this')


def _unit(o, key):
  require(0 <= o[key] <= 1, key, f'must be in [0, 1], got {o[key]}')


def _positive(o, *keys):
  for key in keys:
    require(o[key] > 0, key, f'must be > 0, got {o[key]}')


@SCHEDULES.register('constant', 'learning_rate throughout')
def _constant(o, steps):
  del steps
  return optax.constant_schedule(o.learning_rate)


@SCHEDULES.register('linear', 'straight down to the end rate',
                    lambda o, **_: _unit(o, 'final_lr_fraction'), final_lr_fraction=_END)
def _linear(o, steps):
  return optax.linear_schedule(o.learning_rate, o.learning_rate * o.final_lr_fraction, steps)


@SCHEDULES.register('cosine', 'half a cosine down to the end rate',
                    lambda o, **_: _unit(o, 'final_lr_fraction'), final_lr_fraction=_END)
def _cosine(o, steps):
  return optax.cosine_decay_schedule(o.learning_rate, steps, alpha=o.final_lr_fraction)


@SCHEDULES.register(
    'exponential', 'multiplied by decay_rate every decay_steps',
    lambda o, **_: _positive(o, 'decay_rate', 'decay_steps'),
    decay_rate=Key(0.5, 'the rate is multiplied by this every decay_steps'), decay_steps=1000)
def _exponential(o, steps):
  del steps
  return optax.exponential_decay(o.learning_rate, o.decay_steps, o.decay_rate)


def _check_inverse_time(o, **_):
  require(o.inverse_time_b >= 0 and o.inverse_time_power >= 0, 'inverse_time_b',
          'inverse_time_b and inverse_time_power must be >= 0')


@SCHEDULES.register('inverse_time', 'lr / (1 + b*t)^power, t counted after warmup',
                    _check_inverse_time, inverse_time_b=Key(0.01, 'b in lr / (1 + b*t)^power'),
                    inverse_time_power=0.5)
def _inverse_time(o, steps):
  del steps
  lr, b, power = o.learning_rate, o.inverse_time_b, o.inverse_time_power
  return lambda t: lr / (1.0 + b * t) ** power


def _check_step(o, **_):
  b, f = o.step_boundaries, o.step_factors
  require(len(b) == len(f), 'step_factors', f'{len(f)} factors for {len(b)} boundaries')
  require(all(0 < x < 1 for x in b) and list(b) == sorted(b), 'step_boundaries',
          f'{b} must be increasing fractions in (0, 1)')
  require(all(x > 0 for x in f), 'step_factors', f'{f} must be > 0')


@SCHEDULES.register(
    'step', 'multiplied by step_factors at step_boundaries', _check_step,
    step_boundaries=Key((0.5, 0.75), 'fractions of the steps after warmup where the rate ...'),
    step_factors=Key((0.1, 0.1), '... is multiplied by these'))
def _step(o, steps):
  scales = {}  # boundaries that round to one step multiply together
  for fraction, factor in zip(o.step_boundaries, o.step_factors):
    scales[round(fraction * steps)] = scales.get(round(fraction * steps), 1.0) * factor
  return optax.piecewise_constant_schedule(o.learning_rate, scales)


@SCHEDULES.register(
    'polynomial', 'down to the end rate as (1 - t/T)^polynomial_power',
    lambda o, **_: (_unit(o, 'final_lr_fraction'), _positive(o, 'polynomial_power')),
    final_lr_fraction=_END, polynomial_power=Key(1.0, 'the power of (1 - t/T)'))
def _polynomial(o, steps):
  lr = o.learning_rate
  return optax.polynomial_schedule(lr, lr * o.final_lr_fraction, o.polynomial_power, steps)


def _check_wsd(o, **_):
  _unit(o, 'final_lr_fraction')
  require(0 < o.decay_fraction <= 1, 'decay_fraction', 'must be in (0, 1]')


@SCHEDULES.register(
    'warmup_stable_decay', 'constant, then the last decay_fraction of steps linearly down',
    _check_wsd, final_lr_fraction=_END,
    decay_fraction=Key(0.2, 'the last fraction of steps, decaying linearly'))
def _warmup_stable_decay(o, steps):
  lr = o.learning_rate
  decay = max(round(o.decay_fraction * steps), 1)
  stable, decaying = (optax.constant_schedule(lr),
                      optax.linear_schedule(lr, lr * o.final_lr_fraction, decay))
  return optax.join_schedules([stable, decaying], [steps - decay])


def _check_one_cycle(o, **_):
  require(0 < o.one_cycle_pct_start < 1, 'one_cycle_pct_start', 'must be in (0, 1)')
  _positive(o, 'one_cycle_div_factor', 'one_cycle_final_div_factor')


@SCHEDULES.register(
    'one_cycle', 'up from lr / div_factor, then down (cosine)', _check_one_cycle,
    one_cycle_pct_start=Key(0.3, 'fraction of steps rising to the peak ...'),
    one_cycle_div_factor=Key(25.0, '... from lr / this, then falling to lr / div / final_div'),
    one_cycle_final_div_factor=1e4)
def _one_cycle(o, steps):
  return optax.cosine_onecycle_schedule(steps, o.learning_rate, o.one_cycle_pct_start,
                                        o.one_cycle_div_factor, o.one_cycle_final_div_factor)


def _check_cyclic(o, **_):
  require(o.cycle_steps >= 2, 'cycle_steps', f'must be >= 2, got {o.cycle_steps}')
  _unit(o, 'cycle_min_fraction')


@SCHEDULES.register(
    'cyclic', 'triangular: falling, then rising, every cycle_steps', _check_cyclic,
    cycle_steps=Key(2000, 'one period, falling then rising, ...'),
    cycle_min_fraction=Key(0.1, '... between lr * this and lr'))
def _cyclic(o, steps):
  """Down from lr (where warmup left it) to lr * cycle_min_fraction in half a period, back up in
  the other."""
  del steps
  high, period = o.learning_rate, o.cycle_steps
  low = high * o.cycle_min_fraction

  def schedule(t):
    phase = jnp.mod(t, period) / period
    return low + (high - low) * jnp.abs(2.0 * phase - 1.0)
  return schedule


def _check_restarts(o, **_):
  _unit(o, 'final_lr_fraction')
  require(o.restart_steps >= 1, 'restart_steps', f'must be >= 1, got {o.restart_steps}')
  require(o.restart_mult >= 1, 'restart_mult', f'must be >= 1, got {o.restart_mult}')


@SCHEDULES.register(
    'cosine_restarts', 'cosine down to the end rate, restarting at lr every cycle (SGDR)',
    _check_restarts, final_lr_fraction=_END,
    restart_steps=Key(1000, 'the first cycle; each later one is restart_mult times longer'),
    restart_mult=Key(1.0, '1: cycles of equal length'))
def _cosine_restarts(o, steps):
  """Loshchilov & Hutter 2017: cycle i lasts restart_steps * restart_mult^i steps."""
  del steps
  lr, end, first, mult = (o.learning_rate, o.learning_rate * o.final_lr_fraction,
                          o.restart_steps, o.restart_mult)

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    if mult == 1:
      start, length = jnp.floor(t / first) * first, first
    else:  # cycle i starts at first * (mult^i - 1) / (mult - 1)
      begins = lambda i: first * (mult ** i - 1) / (mult - 1)
      i = jnp.floor(jnp.log1p(t * (mult - 1) / first) / jnp.log(mult))
      i = i + (t >= begins(i + 1)) - (t < begins(i))  # the log's rounding at a boundary
      start, length = begins(i), first * mult ** i
    phase = jnp.clip((t - start) / length, 0.0, 1.0)
    return end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * phase))
  return schedule

def _check_plateau(o, eval_every, **_):
  p = o.plateau
  require(p.metric and eval_every > 0, 'plateau.metric',
          f'{p.metric!r} needs evaluations (a metric name, and train.eval_every > 0)')
  require(p.mode in ('min', 'max'), 'plateau.mode', f'{p.mode!r} is not one of min, max')
  require(0 < p.factor < 1, 'plateau.factor', f'must be in (0, 1), got {p.factor}')
  for key in ('patience', 'cooldown', 'min_delta'):
    require(p[key] >= 0, f'plateau.{key}', f'must be >= 0, got {p[key]}')


# A constant rate, multiplied by `factor` when the eval `metric` has not improved by more than
# `min_delta` for more than `patience` evaluations, then left alone for `cooldown` evaluations
# (PyTorch's ReduceLROnPlateau). The multiplier is optimizer state (training/optimizer.py) that
# the ReduceOnPlateau part lowers between steps.
@SCHEDULES.register(
    'reduce_on_plateau', 'constant, times plateau.factor when the eval metric stalls',
    _check_plateau,
    plateau=Key(dict(metric='loss', mode='min', patience=2, factor=0.5, cooldown=0,
                     min_delta=0.0), 'the eval metric, min|max, patience, factor, cooldown, '
                'min_delta (PyTorch ReduceLROnPlateau)'))
def _reduce_on_plateau(o, steps):
  return _constant(o, steps)
