"""A watchdog for hung steps: a stuck collective or host must not hold a job forever.

The loop calls `beat()` once per step. If no beat comes for `factor` times the median of the
recent step times (and at least `min_seconds`), the watchdog prints every thread's stack and
ends the process with exit_codes.HUNG, so the job scheduler restarts it from the last checkpoint.
"""

import faulthandler
import os
import statistics
import sys
import threading
import time

from training import exit_codes

_WARMUP_BEATS = 3  # the first steps include compilation
_RECENT = 50
_SAVE_WAIT_SECONDS = 120


class Watchdog:
  """Context manager running the watchdog thread while training steps."""

  def __init__(self, factor: float, min_seconds: float, finish_saves=None):
    """`finish_saves`: waits for checkpoint writes in flight, so exiting keeps the newest one."""
    self._factor, self._min_seconds, self._finish_saves = factor, min_seconds, finish_saves
    self._beats = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name='hang-watchdog', daemon=True)

  def __enter__(self):
    if self._factor > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def beat(self):
    self._beats = (self._beats + [time.monotonic()])[-_RECENT:]

  def limit(self) -> float | None:
    """Seconds without a beat that count as a hang; None while warming up."""
    beats = self._beats
    if len(beats) <= _WARMUP_BEATS:
      return None
    recent = [b - a for a, b in zip(beats[_WARMUP_BEATS - 1:], beats[_WARMUP_BEATS:])] or [0.0]
    return max(self._min_seconds, self._factor * statistics.median(recent))

  def _watch(self):
    while not self._stop.wait(min(1.0, self._min_seconds / 4)):
      limit, beats = self.limit(), self._beats
      if limit is not None and time.monotonic() - beats[-1] > limit:
        sys.stderr.write(f'\nWatchdog: no step finished for {limit:.0f} s (over {self._factor}x '
                         'the median step time); stacks of all threads follow.\n')
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self._finish_saves:  # bounded: the save itself may be what hangs
          saving = threading.Thread(target=self._finish_saves, daemon=True)
          saving.start()
          saving.join(_SAVE_WAIT_SECONDS)
        os._exit(exit_codes.HUNG)  # pylint: disable=protected-access; the main thread is stuck
