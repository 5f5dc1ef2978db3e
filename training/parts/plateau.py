"""reduce_on_plateau: the learning rate multiplied down when a validation metric stalls."""

import jax

from tasks.base import Part
from training import config_check, optimizer
from training.parts.early_stopping import improved


class ReduceOnPlateau(Part):
  """optim.schedule=reduce_on_plateau: after an evaluation that makes more than `patience`
  without an improvement of `optim.plateau.metric`, multiplies the learning rate by `factor`,
  then ignores `cooldown` evaluations (PyTorch's ReduceLROnPlateau). The multiplier is an array
  in the optimizer state, so checkpoints and rollbacks carry it; the counters are saved here."""
  name = 'reduce_on_plateau'

  def __init__(self, run):
    self.cfg = run.config.optim.plateau
    self.key = f'eval/{self.cfg.metric}'
    self.best, self.bad_evals, self.cooldown = None, 0, 0

  def after_step(self, run, step, state, results):
    if self.key not in results:
      if any(k.startswith('eval/') for k in results):
        raise config_check.ConfigError(
            f'optim.plateau.metric: {self.cfg.metric!r} is not an eval metric of this task; it '
            f'has {", ".join(sorted(k[5:] for k in results if k.startswith("eval/")))}')
      return None
    if improved(results[self.key], self.best, self.cfg.mode, self.cfg.min_delta):
      self.best, self.bad_evals = results[self.key], 0
    else:
      self.bad_evals += 1
    if self.cooldown:
      self.cooldown, self.bad_evals = self.cooldown - 1, 0
    multiplier = optimizer.lr_multiplier(state['opt_state'])
    if self.bad_evals > self.cfg.patience:
      self.cooldown, self.bad_evals = self.cfg.cooldown, 0
      old = multiplier
      multiplier = jax.device_put(old * self.cfg.factor, old.sharding)  # float32, as on resume
      run.state = {**state, 'opt_state': optimizer.with_lr_multiplier(state['opt_state'],
                                                                      multiplier)}
      run.announce(f'step {step}: {self.key} has not improved; the learning rate is now '
                   f"{float(multiplier):.4g} x the schedule's")
    return {'plateau/lr_multiplier': float(multiplier), 'plateau/bad_evals': self.bad_evals}

  def checkpoint_state(self):
    return {'best': self.best, 'bad_evals': self.bad_evals, 'cooldown': self.cooldown}

  def restore(self, run, saved):
    self.best, self.bad_evals, self.cooldown = saved['best'], saved['bad_evals'], saved['cooldown']


def build(run):
  return [ReduceOnPlateau(run)] if run.config.optim.schedule == 'reduce_on_plateau' else []
