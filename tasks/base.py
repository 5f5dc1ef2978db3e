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
  train_batches / eval_batches / test_batches
                         this process's rows of each global batch (a checkpointable Grain
                         iterator for training; fixed lists for evaluation: eval_batches on a
                         validation split, for every periodic evaluation and all model selection;
                         test_batches, if the task has a test split, once at the end).
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
    return []

  def test_batches(self) -> list[dict]:
    return []

  def parts(self, run) -> list:
    del run
    return []


class Part:
  """A piece of the training loop that is not the step: checkpoints, evaluation, logging, early
  stopping, samples... The loop calls, for each step N:
    after_step(run, N, state, metrics)  right after step N is dispatched, while its state is
        live (the next step donates it). `metrics` holds what earlier parts added for step N
        (e.g. eval/* as host floats); return a dict to add more, or None. A part may set
        `run.state` to a changed state, which later parts and the next step then get.
    after_fetch(run, N, metrics)  step N's metrics as host floats (numpy arrays for vector
        ones), fetched one step late so the host never waits for the device; return a dict of
        figures to add for the parts after it (e.g. health/*, then logged), or None.
  and at_end(run, state) when training reached train.steps. A part with state that must
  survive a restart returns it from `checkpoint_state()` (JSON-able) and takes it back in
  `restore(run, saved)`; it is saved with every checkpoint under the part's `name`.
  `run` (training/loop.py `Run`) offers config, workdir, setup, task, mesh, end, stop(reason),
  announce(line) and report_sections (name -> JSON-able: sections added to summary.json).
  """
  name = ''

  def after_step(self, run, step, state, metrics):
    del run, step, state, metrics

  def after_fetch(self, run, step, metrics):
    del run, step, metrics

  def at_end(self, run, state):
    del run, state

  def checkpoint_state(self):
    return None

  def restore(self, run, saved):
    del run, saved
