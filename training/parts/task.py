"""The task's own parts (`Task.parts`): samples, confusion matrices, ..."""

PLACE = 90


def build(run):
  return run.task.parts(run)
