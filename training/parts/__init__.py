"""The parts of the training loop that are not the step (see `tasks.base.Part`), one module each:
evaluation, early stopping, reduce_on_plateau, checkpoints (with preemption and save errors),
the non-finite policy, metrics and throughput, data health, profiling.
"""


class TrainingHalted(RuntimeError):
  """A policy stopped training (non-finite step, failed save, bad data); says which and why."""
