"""A JAX profiler trace of chosen steps."""

import jax
from etils import epath

from tasks.base import Part


class Profiler(Part):
  """A JAX profiler trace of steps `train.profile_steps` = (first, count), into the TensorBoard
  log dir (plugins/profile/), on process 0 or, with `train.profile_all_hosts`, every host."""

  def __init__(self, run):
    first, count = run.config.train.profile_steps
    self.first, self.last = first, first + count - 1
    self.directory = str(epath.Path(run.workdir) / 'tensorboard')
    self.tracing = False
    self.enabled = count > 0 and (run.config.train.profile_all_hosts or
                                  jax.process_index() == 0)

  def at_start(self, run, state):
    if self.enabled and run.step < self.first <= run.step + 1:  # the first step is the next one
      self._start(run)

  def _start(self, run):
    jax.profiler.start_trace(self.directory)
    self.tracing = True
    run.announce(f'profiling steps {self.first}-{self.last} into {self.directory}')

  def after_step(self, run, step, state, results):
    if not self.enabled:
      return
    if step == self.first - 1:
      self._start(run)
    elif self.tracing and (step == self.last or step == run.end):
      jax.block_until_ready(state)  # the trace ends after the step's device work does
      self.close()

  def close(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def build(run):
  return [Profiler(run)]
