"""The task's own parts (`Task.parts`): samples, confusion matrices, ..."""


def build(run):
  return run.task.parts(run)
