"""The non-finite policy: what a step whose update the guard rejected leads to."""

from data.choices import Registry
from tasks.base import Part
from training import checkpointing
from training.parts import TrainingHalted


class NonFinitePolicy(Part):
  """Skips, rolls back or stops on a step whose update the step's guard rejected (non-finite
  loss or gradients, or a loss spike): `train.nonfinite_policy`, one registered entry each."""
  POLICIES = Registry('train.nonfinite_policy', 'what a step whose update was rejected does')

  def __init__(self, run):
    self.rolled_back_for = set()
    self.act = self.POLICIES[run.config.train.nonfinite_policy].build

  def after_fetch(self, run, step, metrics):
    if metrics['guard/accept']:
      return
    what = ', '.join(k for k in ('nonfinite_loss', 'nonfinite_grads', 'loss_spike')
                     if metrics[f'guard/{k}'])
    self.act(self, run, step, what)

  @POLICIES.register('skip', 'counts and logs it, and goes on')
  def _skip(self, run, step, what):
    run.announce(f'step {step}: {what}; update skipped')

  @POLICIES.register('rollback', 'skips it, then restores the checkpoint before it (once)')
  def _rollback(self, run, step, what):
    self._skip(run, step, what)
    if step in self.rolled_back_for:
      return
    self.rolled_back_for.add(step)  # once: if the step fails again, skipping it is all
    restored = checkpointing.restore_before(run.manager, step, run.setup.abstract_state)
    if restored is None:
      run.announce('no checkpoint before it to roll back to; continuing')
      return
    run.announce(f'rolled back to step {int(restored["step"])}; its data is skipped')
    run.roll_back(restored)

  @POLICIES.register('stop', 'saves the step before it and stops (exit status 1)')
  def _stop(self, run, step, what):
    run.checkpointer.save(run, run.step, run.state, 1, final=True)
    raise TrainingHalted(f'step {step}: {what} (train.nonfinite_policy=stop); the update was '
                         f'not applied and step {run.step} is saved in {run.manager.directory}')


def build(run):
  return [NonFinitePolicy(run)]
