"""The input pipeline's health: unusable records, and the time training waits for data."""

import time

from tasks.base import Part
from training.parts import TrainingHalted, metrics_logger


_MIN_RECORDS_FOR_BAD_FRACTION = 100  # too few records make the fraction noise


class BatchWaits:
  """The loop's waits for its next batch (`next_batch`), over windows between logged steps.
  The first batch's wait is left out (start-up, then compiling follows it), so the first window
  starts at the second."""

  def __init__(self):
    self.window_start = self.waited = None  # None until a batch after the first

  def next_batch(self, iterator):
    started = time.perf_counter()
    batch = next(iterator)
    if self.waited is None:
      self.waited = 0.0
    else:
      self.window_start = self.window_start or started
      self.waited += time.perf_counter() - started
    return batch

  def take(self):
    """(seconds waited, seconds elapsed) in the window now ending, or None before the first;
    the next window starts now."""
    if self.window_start is None:
      return None
    now = time.perf_counter()
    window = (self.waited, now - self.window_start)
    self.window_start, self.waited = now, 0.0
    return window


class DataHealth(Part):
  """The input pipeline's health: reports newly skipped records and stops when too large a share
  of them is unusable; on logged steps, reports the share of the time training waited for data
  (`run.batch_waits`) and the pipeline's own rate (see data.pipeline.RecordStats), warning while
  the share is above `data.warn_wait_share`."""

  def __init__(self, run):
    self.stats, self.waits, self.reported = run.record_stats, run.batch_waits, 0
    self.limit, self.warn_share = run.config.data.max_bad_fraction, run.config.data.warn_wait_share
    # Each process's pipeline makes its rows of a global batch; all together make one.
    self.units_per_batch = run.config.data.global_batch_size * run.task.units_per_example()
    self.rate_key = f'data/pipeline_{run.task.unit}_per_second'
    self.made = (0, 0.0)  # stats.batches and stats.batch_seconds at the window's start
    self.warned = False

  def after_fetch(self, run, step, results):
    stats = self.stats
    if stats.bad > self.reported:
      run.announce(f'data: skipped {stats.bad} unusable of {stats.seen} records read, '
                   f'e.g. {stats.examples[0]}')
      self.reported = stats.bad
    if stats.seen >= _MIN_RECORDS_FOR_BAD_FRACTION and stats.bad_fraction > self.limit:
      raise TrainingHalted(f'data: {stats.bad} of {stats.seen} records read were unusable '
                           f'({stats.bad_fraction:.1%} > data.max_bad_fraction={self.limit}), '
                           f'e.g. {"; ".join(stats.examples)}')
    if not metrics_logger.is_logged(run, step, results):
      return None
    return self.figures(run, sum(results.get('seconds', {}).values()))

  def figures(self, run, excluded_seconds=0.0):
    """The figures of the window since the last logged step; `excluded_seconds` (evaluation)
    do not count."""
    stats = self.stats
    figures = {'data/bad_records': stats.bad, 'data/bad_fraction': stats.bad_fraction}
    window = self.waits.take()
    if window is None:
      return figures
    waited, elapsed = window
    share = waited / max(elapsed - excluded_seconds, 1e-9)
    batches, seconds = stats.batches - self.made[0], stats.batch_seconds - self.made[1]
    figures['data/wait_share'] = share
    if seconds > 0:  # all processes' pipelines together, like the training rate
      figures[self.rate_key] = batches * self.units_per_batch / seconds
    self.made = (stats.batches, stats.batch_seconds)
    if share > self.warn_share and not self.warned:
      run.announce(f'WARNING: training waited for data {share:.1%} of the time since the '
                   f'last log (> data.warn_wait_share={self.warn_share}): the input '
                   'pipeline is too slow; raise data.worker_threads or prefetch_batches')
    self.warned = share > self.warn_share  # warn again only after it recovers
    return figures


def build(run):
  return [DataHealth(run)]
