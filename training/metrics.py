"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and the progress bar."""

import json
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes scalar metrics from process 0; other processes write nothing."""

  def __init__(self, workdir: str, resumed_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.enabled:
      return
    self._tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._writers_opened = 0
    _truncate_after(self.path, resumed_step)
    self._jsonl = open(self.path, 'a', encoding='utf-8')
    self._tensorboard = self._open_tensorboard(resumed_step)

  def _open_tensorboard(self, step: int) -> SummaryWriter:
    """A new event file that makes TensorBoard hide the points past `step` in the earlier ones
    (`purge_step`), as they are about to be written again. Event files are named by the second
    they were opened in: the suffix keeps two from one second apart."""
    self._writers_opened += 1
    return SummaryWriter(self._tensorboard_dir, purge_step=step + 1,
                         filename_suffix=f'.{os.getpid()}.{self._writers_opened:04d}')

  def rewind(self, step: int):
    """Forgets records after `step`, as when training rolls back to it."""
    if self.enabled:
      self._jsonl.close()
      _truncate_after(self.path, step)
      self._jsonl = open(self.path, 'a', encoding='utf-8')
      self._tensorboard.close()
      self._tensorboard = self._open_tensorboard(step)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, step)

  def histogram(self, step: int, name: str, values):
    """A TensorBoard histogram (not in metrics.jsonl); nothing for no values."""
    if self.enabled and len(values):
      self._tensorboard.add_histogram(name, values, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _truncate_after(path: str, step: int):
  """Drops records past `step`: a resumed run rewrites them, so the file keeps one history."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(kept)


def _step_of(line: str):
  """The record's step, or None for a line cut short by a crash."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar with step, loss, throughput (tokens/s, images/s, ...) and ETA, on process 0."""

  def __init__(self, start_step: int, total_steps: int, unit: str = 'tokens'):
    self._unit = unit
    self._bar = tqdm.tqdm(initial=start_step, total=total_steps, unit='step', dynamic_ncols=True,
                          disable=jax.process_index() != 0, mininterval=1.0)

  def update(self, step: int, metrics: dict):
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                          **{f'{self._unit}_s': f"{metrics[f'{self._unit}_per_second']:,.0f}"},
                          mfu=f"{metrics['perf/mfu']:.1%}", refresh=False)

  def write(self, line: str):
    if jax.process_index() == 0:
      self._bar.write(line)

  def close(self):
    self._bar.close()
