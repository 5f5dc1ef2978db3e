"""Logged steps: metrics files, TensorBoard, the progress bar, throughput, the run report."""

import numbers
import time

import jax
from absl import logging

from hardware import chips
from tasks.base import Part
from training import report, metrics as metrics_lib


class Throughput:
  """Units/s (tokens, images, ...) and per device: units/s, analytic model TFLOP/s and MFU."""

  def __init__(self, run, step):
    config, task = run.config, run.task
    self.unit = task.unit
    self._step, self._time = step, time.perf_counter()
    per_example = task.units_per_example()
    self._units_per_step = config.data.global_batch_size * per_example
    model = run.setup.model_module
    self._flops_per_unit = model.train_flops_per_example(config.model, config) / per_example
    self._devices = run.mesh.size
    self._peak = chips.peak_flops_per_device(run.mesh.devices.flat[0])  # CPU: measured, ~1 s

  def update(self, step, excluded_seconds=0.0) -> dict[str, float]:
    """Rates since the last update; `excluded_seconds` (evaluation) do not count as training."""
    now = time.perf_counter()
    seconds = now - self._time - excluded_seconds
    rate = (step - self._step) * self._units_per_step / max(seconds, 1e-9)
    self._step, self._time = step, now
    flops_per_device = rate * self._flops_per_unit / self._devices
    return {f'{self.unit}_per_second': rate,
            f'perf/{self.unit}_per_second_per_device': rate / self._devices,
            'perf/model_tflops_per_device': flops_per_device / 1e12,
            'perf/mfu': flops_per_device / self._peak}


def device_memory(devices) -> dict[str, float]:
  """Device memory figures, each the largest over the local devices, where the backend reports
  them (CPUs do not)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  if not stats:
    return {}
  return {f'memory/{key}': float(max(s.get(key, 0) for s in stats))
          for key in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit')}


def figures(results: dict) -> dict:
  """The numbers among named results: what is logged."""
  return {k: v for k, v in results.items() if isinstance(v, numbers.Real)}


def is_logged(run, step: int, results: dict) -> bool:
  """Whether step N is logged: every `train.log_every`, the last, eval and health-check steps."""
  logged = figures(results)
  evaluated = any(k.startswith('eval/') for k in logged)
  checked = any(k.startswith('health/') for k in logged)  # training/parts/gradient_health.py
  return step % run.config.train.log_every == 0 or step == run.end or evaluated or checked


class MetricsLogger(Part):
  """Logged steps (`is_logged`) to WORKDIR/metrics/, TensorBoard and the progress bar: the
  figures and histograms (`metrics.Histogram`) of the step's results, throughput and device
  memory. When training is complete, the figures at_end returned go into the last record, and
  the run report is written with the `summary/*` sections."""

  def __init__(self, run):
    self.workdir, self.total_steps = run.workdir, run.config.train.steps
    self.throughput = self.writer = self.progress = None  # from the first step on

  def at_start(self, run, state):
    self.throughput = Throughput(run, run.step)
    self.writer = metrics_lib.MetricsWriter(run.workdir, resumed_step=run.step)
    self.progress = metrics_lib.Progress(run.step, self.total_steps, self.throughput.unit)

  def after_fetch(self, run, step, results):
    if not is_logged(run, step, results):
      return
    excluded = sum(results.get('seconds', {}).values())  # evaluations
    values = {**figures(results), **self.throughput.update(step, excluded),
              **device_memory(jax.local_devices())}
    self.writer.write(step, values)
    for name, value in results.items():
      if isinstance(value, metrics_lib.Histogram):
        self.writer.histogram(step, name, value.values)
    self.progress.update(step, values)
    if any(k.startswith('eval/') for k in values):
      shown = '  '.join(f'{k} {v:.4f}' for k, v in values.items() if k.startswith('eval/'))
      self.progress.write(f"step {step}: train/loss {values['train/loss']:.4f}  {shown}")

  def rewind(self, run, step):
    self.writer.rewind(step)

  def close(self):
    if self.writer:
      self.progress.close()
      self.writer.close()

  def at_end(self, run, state, results):
    """The test figures into the last record, and the run report, once training is complete
    (never while a preempted run has seconds to save and exit)."""
    self.writer.add_to_last(figures(results))
    if self.writer.enabled:
      sections = {k.removeprefix('summary/'): v for k, v in results.items()
                  if k.startswith('summary/')}
      try:
        report.write(self.workdir, metrics_lib.read_metrics(self.workdir), self.total_steps,
                     sections, run.task.larger_is_better)
      except Exception as e:  # pylint: disable=broad-except; the run itself is saved and fine
        logging.warning('The run report (summary.json, report.png) was not written: %s: %s',
                        type(e).__name__, e)


def build(run):
  return [MetricsLogger(run)]
