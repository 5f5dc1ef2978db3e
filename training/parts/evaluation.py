"""Evaluation on the validation split during training; `evaluate`, for any parameters."""

import dataclasses
import time

import jax
import numpy as np

from tasks.base import Part


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One pass over a split: the named result `eval` (the validation split's) or `test`."""
  step: int  # the step the parameters are from
  parameters: str  # which: 'last', 'best/', 'ema', ...
  sums: dict  # the task's eval sums over the whole split, host arrays
  figures: dict  # the task's eval metrics from them, unprefixed
  seconds: float  # spent evaluating, which training throughput leaves out


def evaluate(run, state, batches, step: int, parameters: str = 'last') -> Evaluation:
  """The task's eval sums and figures over `batches` (placed) with `state`'s parameters."""
  started = time.perf_counter()
  summed = sums(run.eval_step, state, batches)
  figures = {k: float(v) for k, v in run.task.eval_metrics(summed).items()}
  return Evaluation(step, parameters, summed, figures, time.perf_counter() - started)


def sums(eval_step, state, batches) -> dict:
  """The task's eval sums over `batches` (placed), as host arrays."""
  total = None
  for batch in batches:
    # Fetched batch by batch and added up on the host: the sums are small, an add on the
    # devices is one more multi-device program per batch, and on XLA:CPU eval steps queued
    # behind each other stalled in an all-gather (7 of 8 devices arrived) when all were
    # dispatched before any was fetched.
    batch_sums = jax.device_get(eval_step(state['params'], state.get('model_state'), batch))
    total = batch_sums if total is None else jax.tree.map(np.add, total, batch_sums)
  return total


def with_seconds(results: dict, what: str, seconds: float) -> dict:
  """The named result `seconds` with `what`'s added (a part returns it to keep the others')."""
  return {**results.get('seconds', {}), what: seconds}


def is_eval_step(run, step: int) -> bool:
  every = run.config.train.eval_every
  return bool(run.eval_batches and every and (step % every == 0 or step == run.end))


class Evaluator(Part):
  """Every `train.eval_every` steps and at the last one: the task's metrics on its validation
  split (eval/*, and the named result `eval`), summed over every batch on device, then turned
  into figures on the host; all model selection reads these."""

  def after_step(self, run, step, state, results):
    if not is_eval_step(run, step):
      return None
    evaluation = evaluate(run, state, run.eval_batches, step)
    return {**{f'eval/{k}': v for k, v in evaluation.figures.items()}, 'eval': evaluation,
            'seconds': with_seconds(results, 'eval', evaluation.seconds)}


def build(run):
  return [Evaluator()]
