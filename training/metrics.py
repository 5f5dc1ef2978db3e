"""Where metrics go: WORKDIR/metrics/ (JSON lines), TensorBoard event files, and the progress bar.

Object stores (gs://) cannot append, so the records are kept in chunks, `metrics/00000.jsonl`,
`00001.jsonl`, ...: each record rewrites its chunk whole, and a new chunk starts every
RECORDS_PER_CHUNK records, so a rewrite stays small and the objects few.
"""

import dataclasses
import json
import os
import re
import sys
from typing import Any

from etils import epath
import jax
import tqdm


def _tensorboardx_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch: its writer imports torch wherever
  torch is installed, only to accept torch tensors (podium passes floats and NumPy arrays),
  which cost a run ~180 MiB of RSS and seconds of start-up (benchmarks/whole_run.py)."""
  blocked = 'torch' not in sys.modules
  if blocked:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError, which it catches
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules['torch']  # a later `import torch` elsewhere works as usual
  return SummaryWriter


SummaryWriter = _tensorboardx_writer()

RECORDS_PER_CHUNK = 256
_CHUNK_NAME = re.compile(r'(\d+)\.jsonl')


@dataclasses.dataclass(frozen=True)
class Histogram:
  """Values a part returns (as a named result) to be shown as a TensorBoard histogram on a
  logged step; not in the metrics files."""
  values: Any


class MetricsWriter:
  """Writes scalar metrics from process 0; other processes write nothing."""

  def __init__(self, workdir: str, resumed_step: int):
    self.enabled = jax.process_index() == 0
    self.directory = _metrics_dir(workdir)
    if not self.enabled:
      return
    self._tensorboard_dir = str(epath.Path(workdir) / 'tensorboard')
    self._writers_opened = 0
    self.directory.mkdir(parents=True, exist_ok=True)
    self._chunk, self._lines = _drop_records_after(self.directory, resumed_step)
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
      self._chunk, self._lines = _drop_records_after(self.directory, step)
      self._tensorboard.close()
      self._tensorboard = self._open_tensorboard(step)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    if len(self._lines) >= RECORDS_PER_CHUNK:
      self._chunk, self._lines = self._chunk + 1, []
    self._lines.append(json.dumps({'step': step, **metrics}) + '\n')
    _write_whole(_chunk_path(self.directory, self._chunk), ''.join(self._lines))
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, step)

  def add_to_last(self, metrics: dict):
    """Adds `metrics` to the last record written (e.g. the test figures once training is
    complete), so that every record keeps the training figures of its step."""
    if not self.enabled or not self._lines:
      return
    record = json.loads(self._lines[-1])
    record.update({k: float(v) for k, v in metrics.items()})
    self._lines[-1] = json.dumps(record) + '\n'
    _write_whole(_chunk_path(self.directory, self._chunk), ''.join(self._lines))
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, record['step'])

  def histogram(self, step: int, name: str, values):
    """A TensorBoard histogram (not in the metrics files); nothing for no values."""
    if self.enabled and len(values):
      self._tensorboard.add_histogram(name, values, step)

  def close(self):
    if self.enabled:
      self._tensorboard.close()


def _metrics_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'metrics'


def _chunk_path(directory: epath.Path, chunk: int) -> epath.Path:
  return directory / f'{chunk:05d}.jsonl'


def _chunk_numbers(directory: epath.Path) -> list[int]:
  """The chunks in `directory`, in order (none if it does not exist)."""
  if not directory.exists():
    return []
  names = (_CHUNK_NAME.fullmatch(p.name) for p in directory.iterdir())
  return sorted(int(m.group(1)) for m in names if m)


def _write_whole(path: epath.Path, text: str):
  """Replaces the file at once, so a crash never leaves half of it: an object store publishes an
  object only once it is whole; on a disk, a temporary file is renamed over it."""
  if '://' in str(path):
    path.write_text(text)
    return
  temporary = path.with_name(f'.{path.name}.tmp')
  temporary.write_text(text)
  temporary.replace(path)


def _drop_records_after(directory: epath.Path, step: int) -> tuple[int, list[str]]:
  """Deletes the records after `step` (a resumed run rewrites them, so the files keep one
  history) and returns the last chunk's number and lines. Newest chunk first: a reader
  meanwhile sees the history cut shorter, never a gap in it."""
  for chunk in reversed(_chunk_numbers(directory)):
    path = _chunk_path(directory, chunk)
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)['step'] <= step]
    if kept and len(kept) < len(lines):
      _write_whole(path, ''.join(kept))
    if kept:
      return chunk, kept
    path.unlink()
  return 0, []


def read_metrics(workdir: str) -> list[dict]:
  """Every record of the run in `workdir`, in order; none if it has logged nothing."""
  directory = _metrics_dir(workdir)
  return [json.loads(line) for chunk in _chunk_numbers(directory)
          for line in _chunk_path(directory, chunk).read_text().splitlines()]


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
