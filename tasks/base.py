"""What a task is: everything that differs between workloads, behind one small interface.

The trainer (`training/`) names no task and no model. It asks the task for:
  batch_spec(split)      each batch key's global shape, dtype and logical axes: the step, the loop
                         and `--compile_only` build shardings and abstract batches from it
                         (`batch_shardings`, `abstract_batch`, here and nowhere else).
  loss(model, batch, rngs)
                         the mean loss to minimise and named auxiliary scalars (logged as train/*).
  eval_sums(model, batch)
                         sums and counts over a batch (padding rows weigh 0), so that adding them
                         up over batches and hosts gives the whole eval set's figures exactly.
  eval_metrics(sums)     host-side: the eval figures from those sums (logged as eval/*).
  larger_is_better       which of those figures are better larger (the others: smaller).
  train_batches(stats)   this process's rows of each training batch (a checkpointable Grain
                         iterator).
  split_batches(split)   this process's rows of the fixed batches of 'validation' (every
                         periodic evaluation and all model selection: eval_batches) or 'test'
                         (once at the end: test_batches); [] or data.sources.SplitAbsent, with
                         its reason, where the task has no such split.
  unit, units_per_example
                         the unit of throughput ('tokens', 'images', 'examples').
  parts(run)             extra loop parts, e.g. samples or a confusion matrix at the end.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from parallel import sharding


@dataclasses.dataclass(frozen=True)
class Field:
  """One batch key: its global shape, dtype and logical axis names."""
  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str | None, ...]


def batch_shardings(spec: dict[str, Field], mesh, rules) -> dict:
  return {k: sharding.logical_sharding(mesh, rules, *f.axes) for k, f in spec.items()}


def abstract_batch(spec: dict[str, Field], mesh, rules) -> dict:
  shardings = batch_shardings(spec, mesh, rules)
  return {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=shardings[k])
          for k, f in spec.items()}


def batch_placer(spec: dict[str, Field], mesh, rules):
  """Host batch (this process's rows) -> global arrays sharded as the spec says."""
  shardings = batch_shardings(spec, mesh, rules)

  def place(batch):
    missing = sorted(set(spec) - set(batch))
    if missing:
      raise ValueError(f'batch lacks {", ".join(missing)}; the task declares {sorted(spec)}')
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
            for k in spec}

  return place


def process_rows(global_batch_size: int) -> tuple[int, int]:
  """(first row, row count) of this process's share of each global batch."""
  rows = global_batch_size // jax.process_count()
  return jax.process_index() * rows, rows


class Task:
  """Base class; subclasses override what differs. `config` is the whole run config."""
  unit = 'examples'
  # Endings of the eval metrics that are better larger ('accuracy' covers 'top5_accuracy');
  # every other one is better smaller. The run report's best values (summary.json) follow it.
  larger_is_better: tuple[str, ...] = ()

  def __init__(self, config, model_module):
    self.config, self.model_module = config, model_module

  def validate(self):
    """Raises ValueError('<section>.<key>: ...') for task and data keys that cannot work."""

  def validate_processes(self, num_processes: int):
    """Raises ValueError('data.<key>: ...') for data that `num_processes` cannot share out."""

  def batch_spec(self, split: str) -> dict[str, Field]:
    raise NotImplementedError

  def units_per_example(self) -> int:
    return 1

  def loss(self, model, batch, rngs):
    raise NotImplementedError

  def eval_sums(self, model, batch) -> dict:
    raise NotImplementedError

  def eval_metrics(self, sums: dict) -> dict[str, float]:
    raise NotImplementedError

  def train_batches(self, stats):
    raise NotImplementedError

  def eval_batches(self) -> list[dict]:
    """The validation split's batches; none when the run never evaluates."""
    return self.split_batches('validation') if self.config.train.eval_every else []

  def test_batches(self) -> list[dict]:
    return self.split_batches('test')

  def split_batches(self, split: str) -> list[dict]:
    """This process's rows of the fixed batches of `split` ('validation' or 'test'); [] or
    data.sources.SplitAbsent where the task has no such split."""
    del split
    return []

  def parts(self, run) -> list:
    del run
    return []


class Part:
  """A piece of the training loop that is not the step: evaluation, checkpoints, logging, early
  stopping, samples... `training.parts.build` makes a run's parts, in one list, from the modules
  of `training/parts/` (in its ORDER) and the task's `parts(run)`. The loop
  calls every part's hooks in that order:

    at_start(run, state)  once, before the first step of this process (on a fresh, warm-started
        or restored state); not when a rerun finds training already complete.
    after_step(run, N, state, results)  right after step N is dispatched, while its state is
        live (the next step donates it). A part may set `run.state` to a changed state, which
        later parts and the next step then get (reduce_on_plateau's multiplier).
    after_fetch(run, N, results)  step N's results on the host, fetched one step late so the
        host never waits for the device (numbers as Python floats, vectors as numpy arrays).
    rewind(run, N)  training rolled back to step N (the non-finite policy): forget later steps.
    at_end(run, state, results)  when training is complete (train.steps, or an early stop),
        after the last step; `results` holds what earlier parts' at_end returned.
    close()  always, last: on success, preemption and errors alike.

  Parts exchange data only through named results. `results` of step N holds what the train step
  returned (train/*, guard/*, learning_rate, health/norms, ...) and what earlier parts returned
  for it: each hook but rewind and close may return a dict that the loop merges in for the parts
  after it. A number is a figure, logged under its name (metrics files, TensorBoard; at_end: added
  to the last record); a `training.metrics.Histogram` is a TensorBoard histogram; at_end, a
  `summary/<name>` dict is a section of summary.json; anything else is for other parts only:
  `eval` and `test` (a `training.parts.evaluation.Evaluation`: its split's sums, figures and
  step), `seconds` (host seconds spent evaluating after step N, by what: `eval`, ...; they do
  not count as training time).

  Saved state: a part with a `name` whose state must survive a restart returns it from
  `checkpoint_state()` (JSON-able; the checkpoint's `loop` item) and takes it back in
  `restore(run, saved)`; arrays (a pytree of jax.Arrays, kept sharded) it returns from
  `checkpoint_arrays()` (the checkpoint's `parts` item) and takes back in `restore_arrays(run,
  arrays)`. Before the run starts, `checkpoint_arrays()` returns their jax.ShapeDtypeStructs
  (with shardings), which the restore reads into. Both are saved with every checkpoint and
  restored before at_start.

  `run` (training/loop.py `Run`) offers config, workdir, mesh, setup, task, manager, train_iter,
  record_stats, batch_waits, eval_step, place_eval, eval_batches (placed), test_batches (on the
  host), step, state, end, stop(reason), roll_back(state), announce(line), loop_state() and
  part_arrays() (every part's saved state, for the checkpointer), and checkpointer (to save now).
  """
  name = ''

  def at_start(self, run, state):
    del run, state

  def after_step(self, run, step, state, results):
    del run, step, state, results

  def after_fetch(self, run, step, results):
    del run, step, results

  def rewind(self, run, step):
    del run, step

  def at_end(self, run, state, results):
    del run, state, results

  def close(self):
    pass

  def checkpoint_state(self):
    return None

  def restore(self, run, saved):
    del run, saved

  def checkpoint_arrays(self):
    return None

  def restore_arrays(self, run, arrays):
    del run, arrays
