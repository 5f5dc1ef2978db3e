"""Preemption: SIGTERM or SIGINT asks the loop to checkpoint the current step and exit cleanly.

On one process the signal handler sets a flag the loop reads after each step. On several, each
host may see the signal at a different step, so the hosts agree on one through JAX's preemption
sync point (`CheckpointManager.reached_preemption`). JAX catches SIGTERM itself there, so no
Python handler may replace its own; Ctrl-C on one host of many simply interrupts it.
"""

import signal

import jax
import orbax.checkpoint as ocp

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
  """Context manager that turns SIGTERM/SIGINT into a request to stop at the next step."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    for sig in _SIGNALS:
      self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _on_signal(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user means it
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._manager.reached_preemption(step)
    return self.signal_name is not None
