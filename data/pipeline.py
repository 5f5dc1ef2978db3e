"""Grain pipeline: source -> stream -> shuffle -> repeat -> tokenize -> pack -> batch -> prefetch.

The documents are dealt into `num_streams` streams, each shuffled, packed and batched on its own;
a global batch is the streams' rows side by side, stream 0 first. A process reads only the
streams it owns, so the global batches depend on the seed and the number of streams, never on
how many processes share them. The iterator's state is small and saved with each checkpoint, so
a resumed run sees exactly the batches it would have seen.
"""

import threading
from collections.abc import Sequence

import grain
import numpy as np

DOCUMENT_SEPARATOR = 0  # a byte that never occurs in text; ends every document


def tokenize(document: bytes) -> dict[str, np.ndarray]:
  """Bytes -> token ids 0..255, with the separator appended."""
  tokens = np.frombuffer(document, dtype=np.uint8).astype(np.int32)
  return {'tokens': np.append(tokens, np.int32(DOCUMENT_SEPARATOR))}


class RecordStats:
  """Counts records read and records skipped as unusable, keeping a few examples of the latter.

  Counts cover this process since it started (prefetching reads a little ahead of training).
  """

  def __init__(self, max_examples: int = 3):
    self._lock = threading.Lock()
    self.seen = self.bad = 0
    self.examples = []
    self._max_examples = max_examples

  def count(self, problem: str | None):
    with self._lock:
      self.seen += 1
      if problem:
        self.bad += 1
        if len(self.examples) < self._max_examples:
          self.examples.append(problem)

  @property
  def bad_fraction(self) -> float:
    return self.bad / max(self.seen, 1)


def _load(source, stats: RecordStats):  # source: a data.sources class
  """Index -> tokens, or None (counted) for a record that cannot be read or is not text."""

  def load(index):
    try:
      document = source[index]
      problem = None if document else 'empty'
      document.decode('utf-8')
    except UnicodeDecodeError as e:
      problem = f'invalid UTF-8 at byte {e.start}'
    except Exception as e:  # pylint: disable=broad-except; a bad record must not stop training
      problem = f'{type(e).__name__}: {e}'
    stats.count(problem and f'{source.record_name(index)}: {problem}')
    return None if problem else tokenize(document)

  return load


def batches(source, *, seq_len: int, batch_size: int, seed: int, shuffle: bool,
            streams: Sequence[int] = (0,), num_streams: int = 1, worker_threads: int = 2,
            prefetch_batches: int = 4, stats: RecordStats | None = None) -> grain.IterDataset:
  """Endless batches {'tokens': int32[batch_size, seq_len + 1]} (inputs and shifted targets).

  `batch_size` rows are shared equally by `streams`, this process's streams out of
  `num_streams`. Unusable records are skipped and counted in `stats`.
  """
  stats = stats or RecordStats()
  threads = max(1, worker_threads // len(streams))
  parts = [_stream(source, stream, num_streams, seq_len=seq_len,
                   rows=batch_size // len(streams), seed=seed, shuffle=shuffle, threads=threads,
                   stats=stats) for stream in streams]
  ds = parts[0]
  if len(parts) > 1:
    ds = grain.experimental.ZipIterDataset(parts).map(
        lambda rows: {'tokens': np.concatenate([r['tokens'] for r in rows])})
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def _stream(source, stream, num_streams, *, seq_len, rows, seed, shuffle, threads, stats):
  """Batches of `rows` packed sequences from every `num_streams`-th document, from `stream`."""
  docs = grain.MapDataset.range(len(source))[stream::num_streams]
  if shuffle:
    docs = docs.shuffle(seed=int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))
  docs = docs.repeat().map(_load(source, stats)).filter(lambda x: x is not None)
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  sequences = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(read_options), length_struct={'tokens': seq_len + 1})
  return sequences.map(lambda x: {'tokens': x['tokens']}).batch(rows, drop_remainder=True)
