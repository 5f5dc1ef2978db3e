"""The parts of the training loop that are not the step (the contract: `tasks.base.Part`).

One module per part. A module that makes parts has `build(run) -> list[Part]` (none when its
config turns it off) and `PLACE`, where they go in the order the loop calls them, and, if it has
config keys of its own, `validate(config)`; `build` and `validate` below gather them all, so a
new part (EMA weights, a custom evaluation) is one new module here. Who must come before whom,
and the places taken:

   10 evaluation      eval/* and the named result `eval`, read by the parts after it
   20 early_stopping  reads eval/*; at the end, offers its best parameters (`best_state`)
   25 test_split      at the end: the test split, on those parameters or the last
   30 plateau         reads eval/*; changes the state before it is saved
   40 gradient_health health/* figures, before they are logged
   50 checkpointer    saves every part's state above as it is after the step
   60 nonfinite       may roll back or stop
   70 data_health     data/* figures on logged steps
   80 profiler
   90 task            the task's own parts (samples, confusion matrices, ...)
  100 metrics_logger  logs what all of the above returned; the run report at the end
"""

import importlib
import pkgutil


class TrainingHalted(RuntimeError):
  """A policy stopped training (non-finite step, failed save, bad data); says which and why."""


def build(run) -> list:
  """The run's parts, in the order the loop calls them: those of every module here by PLACE."""
  return [part for module in _modules() if hasattr(module, 'build')
          for part in module.build(run)]


def validate(config):
  """Raises ValueError('<section>.<key>: ...') for a part's keys that cannot work: each module
  here with keys of its own checks them in its `validate(config)`, before anything compiles."""
  for module in _modules():
    if hasattr(module, 'validate'):
      module.validate(config)


def _modules():
  """This package's modules, in PLACE order (those without parts last)."""
  modules = [importlib.import_module(f'{__name__}.{m.name}')
             for m in pkgutil.iter_modules(__path__)]
  return sorted(modules, key=lambda m: getattr(m, 'PLACE', float('inf')))
