"""Learning-rate schedules chosen by name (training/schedules.py): each against a hand
computation, warmup, a fork's own schedule as one registered entry, and reduce_on_plateau's
multiplier through a kill and resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from data import choices
from tests.test_faults import _assert_same_state, _losses
from tests.test_optimizers import PARAMS, _check, _grads, _optim
from tests.test_train_e2e import REPO, run_train, saved_state
from training import config_check, metrics, optimizer, schedules
from training.step import learning_rate


# Schedules by hand, in steps t (warmup of W=2 to lr=0.01, then T=10 more steps to the end).
W, T, LR = 2, 10, 0.01
SCHEDULE_KEYS = dict(final_lr_fraction=0.2, decay_rate=0.5, decay_steps=4, inverse_time_b=0.3,
                     inverse_time_power=0.7, step_boundaries=(0.3, 0.6), step_factors=(0.5, 0.1),
                     polynomial_power=2.0, decay_fraction=0.3, one_cycle_pct_start=0.4,
                     one_cycle_div_factor=10.0, one_cycle_final_div_factor=100.0, cycle_steps=4,
                     cycle_min_fraction=0.25, restart_steps=2, restart_mult=2.0)
END = LR * 0.2


def _cosine_restarts(s):
  """Cosine cycles of 2, 4, 8, ... steps, each from LR down to END."""
  start, length = 0, 2
  while s >= start + length:
    start, length = start + length, 2 * length
  return END + (LR - END) * 0.5 * (1 + np.cos(np.pi * (s - start) / length))


AFTER_WARMUP = {
    'constant': lambda s: LR,
    'reduce_on_plateau': lambda s: LR,
    'linear': lambda s: LR + (END - LR) * s / T,
    'cosine': lambda s: END + (LR - END) * 0.5 * (1 + np.cos(np.pi * s / T)),
    'exponential': lambda s: LR * 0.5 ** (s / 4),
    'inverse_time': lambda s: LR / (1 + 0.3 * s) ** 0.7,
    'step': lambda s: LR * (0.5 if s >= 3 else 1) * (0.1 if s >= 6 else 1),
    'polynomial': lambda s: END + (LR - END) * (1 - s / T) ** 2,
    'warmup_stable_decay': lambda s: LR if s < 7 else LR + (END - LR) * (s - 7) / 3,
    'one_cycle': optax.cosine_onecycle_schedule(T, LR, 0.4, 10.0, 100.0),
    'cyclic': lambda s: 0.25 * LR + 0.75 * LR * abs(2 * (s % 4) / 4 - 1),
    'cosine_restarts': _cosine_restarts,
}


def _hand_schedule(kind, t):
  return LR * t / W if t < W else float(AFTER_WARMUP[kind](t - W))


def test_every_schedule_is_tested():
  assert set(AFTER_WARMUP) == set(optimizer.SCHEDULES)


@pytest.mark.parametrize('kind', sorted(AFTER_WARMUP))
def test_schedule_drives_the_update_and_is_read_back(kind):
  """Plain SGD (no momentum): each update is -lr(t) * gradient, with lr(t) by hand."""
  o = _optim(name='sgd', schedule=kind, **SCHEDULE_KEYS)
  o.sgd.momentum = 0.0
  tx = optimizer.make_optimizer(o, total_steps=W + T)
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  for t in range(W + T):
    updates, state = update(_grads(t), state, PARAMS)
    expected = _hand_schedule(kind, t)
    np.testing.assert_allclose(learning_rate(state), expected, rtol=1e-5, atol=1e-9)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -expected * g, rtol=1e-5, atol=1e-9),
                 updates, _grads(t))


def test_plateau_multiplier_scales_the_update_and_the_rate_read_back():
  o = _optim(name='sgd', schedule='reduce_on_plateau', warmup_steps=0)
  o.sgd.momentum = 0.0
  tx = optimizer.make_optimizer(o, total_steps=10)
  state = tx.init(PARAMS)
  assert optimizer.lr_multiplier(state) == 1.0
  state = optimizer.with_lr_multiplier(state, jnp.float32(0.25))
  updates, state = tx.update(_grads(0), state, PARAMS)
  np.testing.assert_allclose(learning_rate(state), 0.25 * LR, rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.25 * LR * _grads(0)['dense']['kernel'],
                             rtol=1e-6)


def test_warmup_is_linear_from_zero():
  schedule = optimizer.learning_rate_schedule(_optim(schedule='constant', learning_rate=1.0,
                                                     warmup_steps=10), total_steps=100)
  np.testing.assert_allclose([schedule(t) for t in (0, 5, 10, 50)], [0.0, 0.5, 1.0, 1.0])


def test_a_new_schedule_is_one_registered_entry():
  """A fork's schedule, registered here and nowhere else: its key is in the `optim` section with
  its comment, validation accepts it, the chain builds it, and its key is rejected when
  another schedule is chosen."""
  @schedules.SCHEDULES.register(
      'halving', 'halves every halving_steps',
      lambda o, **_: choices.require(o.halving_steps > 0, 'halving_steps', 'must be > 0'),
      halving_steps=choices.Key(3, 'steps between halvings'))
  def _halving(o, steps):
    del steps
    return lambda t: o.learning_rate * 0.5 ** (t // o.halving_steps)

  try:
    config = default.get_config()
    assert config.optim.halving_steps == 3
    assert choices.comments()['optim.halving_steps'] == 'halving: steps between halvings'
    assert choices.comments()['optim.schedule'].endswith('| reduce_on_plateau | halving')
    config.optim.halving_steps = 5
    with pytest.raises(config_check.ConfigError,
                       match="optim.halving_steps: set to 5, but optim.schedule='cosine'"):
      _check(config)
    config.optim.update(schedule='halving', halving_steps=3, name='sgd', learning_rate=LR,
                        warmup_steps=W)
    _check(config, ['optim.name'])
    config.optim.sgd.momentum = 0.0
    tx = optimizer.make_optimizer(optimizer.keep_chosen(config.optim, ['optim.name']), W + T)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for _ in range(W + 6):
      _, state = update(_grads(0), state, PARAMS)
    np.testing.assert_allclose(learning_rate(state), LR * 0.5, rtol=1e-6)  # t=5 after warmup
    config.optim.halving_steps = 0
    with pytest.raises(config_check.ConfigError, match='optim.halving_steps: must be > 0'):
      _check(config, ['optim.name'])
  finally:
    del schedules.SCHEDULES.entries['halving']


# --- reduce_on_plateau through a kill and resume ------------------------------------------------

# SGD with momentum under FSDP, from the command line. `mode=max` on the eval loss, which falls:
# never an improvement, so with patience 0 the multiplier halves at every eval after the first.
PLATEAU = ['--config=' + os.path.join(REPO, 'configs', 'default.py') + ':tiny,fsdp',
           '--config.optim.name=sgd', '--config.optim.sgd.momentum=0.9',
           '--config.optim.schedule=reduce_on_plateau', '--config.optim.plateau.mode=max',
           '--config.optim.plateau.patience=0', '--config.train.steps=6',
           '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
           '--config.task.num_samples=0']


def test_plateau_multiplier_is_checkpointed_and_resumes_bit_for_bit(tmp_path):
  unbroken, broken = tmp_path / 'unbroken', tmp_path / 'broken'
  assert run_train(unbroken, *PLATEAU).returncode == 0
  records = metrics.read_metrics(unbroken)
  multipliers = [r['plateau/lr_multiplier'] for r in records if 'plateau/lr_multiplier' in r]
  assert multipliers == [1.0, 0.5, 0.25]  # evals at steps 2, 4, 6
  rates = {r['step']: r['learning_rate'] for r in records}
  assert rates[4] == pytest.approx(3e-3) and rates[5] == pytest.approx(0.5 * 3e-3)  # as used
  assert run_train(broken, *PLATEAU, '--config.train.stop_after=4').returncode == 0
  resumed = run_train(broken, *PLATEAU)  # the multiplier was lowered at step 4, then saved
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resumed from the checkpoint at step 4' in resumed.stdout
  assert _losses(broken) == _losses(unbroken)
  state = saved_state(broken, 6)
  assert optimizer.lr_multiplier(state['opt_state']) == 0.25
  _assert_same_state(state, saved_state(unbroken, 6))
