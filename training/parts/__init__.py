"""The parts of the training loop that are not the step (the contract: `tasks.base.Part`).

One module per part, with `build(run) -> list[Part]` (none when its config turns it off) and,
if it has config keys of its own, `validate(config)`. ORDER below is the one list of them, in
the order the loop calls them; a new part (a custom evaluation) is a new module and its line
there.
"""

import importlib


class TrainingHalted(RuntimeError):
  """A policy stopped training (non-finite step, failed save, bad data); says which and why."""


# The loop calls the parts in this order; who must come before whom:
ORDER = (
    'evaluation',  # eval/* and the named result `eval`, read by the parts after it
    'ema',  # the average's eval_ema/* at the evaluator's steps; saved by the checkpointer
    'early_stopping',  # reads eval/*; at the end, offers its best parameters (`best_state`)
    'test_split',  # at the end: the test split, on those parameters or the last
    'plateau',  # reads eval/*; changes the state before it is saved
    'gradient_health',  # health/* figures, before they are logged
    'checkpointer',  # saves every part's state above as it is after the step
    'nonfinite',  # may roll back or stop
    'data_health',  # data/* figures on logged steps
    'profiler',
    'task',  # the task's own parts (samples, confusion matrices, ...)
    'metrics_logger',  # logs what all of the above returned; the run report at the end
)


def build(run) -> list:
  """The run's parts, in ORDER."""
  return [part for module in _modules() for part in module.build(run)]


def validate(config):
  """Raises ValueError('<section>.<key>: ...') for a part's keys that cannot work: each module
  here with keys of its own checks them in its `validate(config)`, before anything compiles."""
  for module in _modules():
    if hasattr(module, 'validate'):
      module.validate(config)


def _modules():
  return [importlib.import_module(f'{__name__}.{name}') for name in ORDER]
