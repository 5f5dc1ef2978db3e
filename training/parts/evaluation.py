"""Evaluation on the validation split during training, and on the test split at the end."""

import time

import jax
import numpy as np

from tasks.base import Part
from training.parts.early_stopping import EarlyStopping


class Evaluator(Part):
  """Every `train.eval_every` steps and at the last one: the task's metrics on its validation
  split (eval/*), summed over every batch on device, then turned into figures on the host; all
  model selection reads these. When training is complete: the test split's (test/*), once, on
  early stopping's best parameters if it kept some, else the last."""

  def __init__(self, run):
    self.batches = [run.place_eval(b) for b in run.eval_batches]
    self.every = run.config.train.eval_every

  def after_step(self, run, step, state, metrics):
    if not (self.batches and self.every and (step % self.every == 0 or step == run.end)):
      return None
    started = time.perf_counter()
    run.last_eval_sums = _sums(run, state, self.batches)
    run.eval_seconds += time.perf_counter() - started  # kept out of training throughput
    figures = run.task.eval_metrics(run.last_eval_sums)
    return {f'eval/{k}': float(v) for k, v in figures.items()}

  def at_end(self, run, state):
    if not run.test_batches:
      return
    early = next((p for p in run.parts if isinstance(p, EarlyStopping)), None)
    kept = early.best_state(run) if early else None
    run.test_step = early.best_step if kept else run.step
    run.test_sums = _sums(run, kept or state, [run.place_eval(b) for b in run.test_batches])
    figures = {f'test/{k}': float(v) for k, v in run.task.eval_metrics(run.test_sums).items()}
    which = 'best/' if kept else 'last'
    run.logger.writer.add_to_last(figures)
    run.report_sections['test'] = {'step': run.test_step, 'parameters': which, **figures}
    run.announce(f'test split, step {run.test_step} ({which} parameters): ' +
                 '  '.join(f'{k} {v:.4f}' for k, v in figures.items()))


def _sums(run, state, batches):
  """The task's eval sums over `batches` (placed), as host arrays."""
  sums = None
  for batch in batches:
    # Fetched batch by batch and added up on the host: the sums are small, an add on the
    # devices is one more multi-device program per batch, and on XLA:CPU eval steps queued
    # behind each other stalled in an all-gather (7 of 8 devices arrived) when all were
    # dispatched before any was fetched.
    batch_sums = jax.device_get(run.eval_step(state['params'], state.get('model_state'), batch))
    sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
  return sums
