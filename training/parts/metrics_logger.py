"""Logged steps: metrics files, TensorBoard, the progress bar, throughput, the run report."""

import time

import jax
import numpy as np
from absl import logging

from hardware import chips
from models import MODELS
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
    model = MODELS[config.model.name]
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


class MetricsLogger(Part):
  """Logged steps (every `train.log_every`, eval and health-check steps, the last) to
  WORKDIR/metrics/, TensorBoard and the progress bar."""

  def __init__(self, run, start):
    self.every = run.config.train.log_every
    self.throughput = Throughput(run, start)
    self.writer = metrics_lib.MetricsWriter(run.workdir, resumed_step=start)
    self.progress = metrics_lib.Progress(start, run.config.train.steps, self.throughput.unit)
    self.workdir, self.total_steps = run.workdir, run.config.train.steps

  def after_fetch(self, run, step, metrics):
    metrics = {k: v for k, v in metrics.items() if np.ndim(v) == 0}  # scalars only
    evaluated = any(k.startswith('eval/') for k in metrics)
    checked = any(k.startswith('health/') for k in metrics)  # training/health.py
    if not (step % self.every == 0 or step == run.end or evaluated or checked):
      return
    values = {**metrics, **self.throughput.update(step, run.eval_seconds),
              **run.data_health.figures(), **device_memory(jax.local_devices())}
    run.eval_seconds = 0.0
    self.writer.write(step, values)
    self.progress.update(step, values)
    if evaluated:
      figures = '  '.join(f'{k} {v:.4f}' for k, v in values.items() if k.startswith('eval/'))
      self.progress.write(f"step {step}: train/loss {values['train/loss']:.4f}  {figures}")

  def rewind(self, step):
    self.writer.rewind(step)

  def close(self):
    self.progress.close()
    self.writer.close()

  def at_end(self, run, state):
    """The run report, once training is complete (never while a preempted run has seconds to
    save and exit)."""
    if self.writer.enabled:
      try:
        report.write(self.workdir, metrics_lib.read_metrics(self.workdir), self.total_steps,
                     run.report_sections)
      except Exception as e:  # pylint: disable=broad-except; the run itself is saved and fine
        logging.warning('The run report (summary.json, report.png) was not written: %s: %s',
                        type(e).__name__, e)
