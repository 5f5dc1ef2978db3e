"""Checkpoints: periodic, final and on preemption; failed writes warn or stop."""

import contextlib

from tasks.base import Part
from training import checkpointing, preemption
from training.parts import TrainingHalted


class Checkpointer(Part):
  """Saves every `train.checkpoint_every` steps, at the last step and when preempted (SIGTERM,
  SIGINT, or a pod's preemption notice); a failed write warns or stops as configured. The loop
  makes it (`run.checkpointer`: a policy may save now) and checks the last save; it watches for
  preemption from the first step to the final save."""

  def __init__(self, run):
    self.watcher = preemption.PreemptionWatcher(run.manager)
    self.watching = False
    self.preempted = False
    self.failure = ''  # the last failed write's error, for the run's last line

  def at_start(self, run, state):
    self.watcher.__enter__()
    self.watching = True

  def after_step(self, run, step, state, results):
    self.preempted = self.watcher.should_stop(step)
    final = step == run.end or self.preempted
    self.save(run, step, state, run.config.train.checkpoint_every, final)
    if final:
      self.close()
    if self.preempted:
      run.stop(f'{self.watcher.signal_name or "Preemption"} received: saved step {step} to '
               f'{run.manager.directory / str(step)}; rerun to resume.', complete=False)
    return None

  def save(self, run, step, state, every, final):
    # An earlier write's failure is reported first, on its own: this step is saved regardless.
    with self._save_errors(run, step):
      checkpointing.raise_failed_save(run.manager)
    with self._save_errors(run, step):
      checkpointing.save(run.manager, step, state, run.train_iter, every, final=final,
                         loop_state=run.loop_state(), arrays=run.part_arrays())
    if final:
      with self._save_errors(run, step):
        run.manager.wait_until_finished()
        # Not redundant: a write's error can still sit in the checkpointer's slot after the
        # wait returns (the disk-full test with on_save_error=warn misses it otherwise).
        run.manager.check_for_errors()

  def check_saved(self, run, step):
    """TrainingHalted unless the checkpoint of `step`, where the run ended, is complete."""
    run.manager.reload()  # its list of steps, as the storage has it
    if step in run.manager.all_steps():
      return
    kept = run.manager.latest_step()
    raise TrainingHalted(
        f'step {step} was not saved ({self.failure or "its checkpoint is missing"}); a rerun '
        + (f'resumes from step {kept}' if kept is not None else 'starts from scratch'))

  @contextlib.contextmanager
  def _save_errors(self, run, step):
    """A failed checkpoint write (disk full, storage down) warns or stops, as configured."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except; whatever the storage raised
      self.failure = (f'checkpoint write failed (noticed at step {step}; {type(e).__name__}: '
                      f'{" ".join(str(e).split())[:300]})')
      if run.config.train.on_save_error == 'stop':
        raise TrainingHalted(f'{self.failure}; the checkpoints already written are kept') from e
      run.announce(f'WARNING: {self.failure}; training continues')

  def close(self):
    if self.watching:
      self.watcher.__exit__(None, None, None)
      self.watching = False


def build(run):
  return [run.checkpointer]
