"""Grain pipeline: source -> shard -> shuffle -> repeat -> tokenize -> pack -> batch -> prefetch.

The order is a pure function of the seed and the shard, and the iterator's state is small and
saved with each checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

import threading

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
            shard_index: int = 0, shard_count: int = 1, worker_threads: int = 2,
            prefetch_batches: int = 4, stats: RecordStats | None = None) -> grain.IterDataset:
  """Endless batches {'tokens': int32[batch_size, seq_len + 1]} (inputs and shifted targets).

  Each shard (one per process) reads only its own documents. Unusable records are skipped and
  counted in `stats`.
  """
  docs = grain.MapDataset.range(len(source))[shard_index::shard_count]
  if shuffle:
    docs = docs.shuffle(seed=seed)
  docs = docs.repeat().map(_load(source, stats or RecordStats())).filter(lambda x: x is not None)
  read_options = grain.ReadOptions(num_threads=worker_threads,
                                   prefetch_buffer_size=4 * worker_threads)
  sequences = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(read_options), length_struct={'tokens': seq_len + 1})
  ds = sequences.map(lambda x: {'tokens': x['tokens']}).batch(batch_size, drop_remainder=True)
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds
