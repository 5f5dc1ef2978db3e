"""Grain pipeline: source -> stream -> shuffle -> repeat -> tokenize -> pack -> batch -> prefetch.

The documents are dealt into `num_streams` streams, each shuffled, packed and batched on its own;
a global batch is the streams' rows side by side, stream 0 first. A process reads only the
streams it owns, so the global batches depend on the seed and the number of streams, never on
how many processes share them. The iterator's state is small and saved with each checkpoint, so
a resumed run sees exactly the batches it would have seen. The state names each stream's
position, so a run resumed on another number of processes hands each stream to its new owner.
A mixture of sources is mixed within each stream, so all of this holds for mixtures too.
"""

import os
import threading
import time
from collections.abc import Sequence

import grain
import numpy as np

from data import sources, tokenizers


def tokenize(document, tokenizer=None) -> dict[str, np.ndarray]:
  """A document -> its token ids with the tokenizer's eos appended. Text (UTF-8 bytes) is encoded
  with `tokenizer` (default: bytes, ids 0..255); a prepared document (uint32 ids) is taken as
  is, after checking its ids are the tokenizer's. Raises on text that is not UTF-8."""
  tokenizer = tokenizer or tokenizers.load('')
  if isinstance(document, bytes):
    document.decode('utf-8')
    ids = tokenizer.encode(document)
  else:
    ids = np.asarray(document)
    if ids.size and int(ids.max()) >= tokenizer.vocab_size:
      raise ValueError(f'token id {int(ids.max())} is not below the vocab size '
                       f'{tokenizer.vocab_size}')
  return {'tokens': np.append(ids.astype(np.int32), np.int32(tokenizer.eos_id))}


class RecordStats:
  """Counts records read and records skipped as unusable, keeping a few examples of the latter,
  and the time the pipeline spent making batches.

  Counts cover this process since it started (prefetching reads a little ahead of training).
  `batches` and `batch_seconds` say how fast the pipeline makes batches when it works: seconds
  of work per batch, over the number of threads doing that work side by side (pipelines call
  `add_batch_work`), so batches / batch_seconds is the pipeline's rate alone, without waits for
  a full prefetch buffer or for training.
  """

  def __init__(self, max_examples: int = 3):
    self._lock = threading.Lock()
    self.seen = self.bad = self.batches = 0
    self.batch_seconds = 0.0
    self.examples = []
    self._max_examples = max_examples

  def count(self, problem: str | None):
    with self._lock:
      self.seen += 1
      if problem:
        self.bad += 1
        if len(self.examples) < self._max_examples:
          self.examples.append(problem)

  def add_batch_work(self, seconds: float, threads: int = 1):
    """One batch made in `seconds` by one of `threads` threads working side by side."""
    with self._lock:
      self.batches += 1
      self.batch_seconds += seconds / threads

  @property
  def bad_fraction(self) -> float:
    return self.bad / max(self.seen, 1)


def resolve_threads(worker_threads: int) -> int:
  """data.worker_threads, or for 0 half this host's CPUs (1 to 16): on a small host the
  training step needs the rest (on 2 cores, an augmented CNN waited for data 1.6% of the time
  with 2 pipeline threads and 0.6% with 1), and a TPU host has CPUs to spare."""
  return worker_threads or min(16, max(1, (os.cpu_count() or 2) // 2))


class TimedIterDataset(grain.IterDataset):
  """Its parent, adding the time each batch takes to come out of it to `stats` (see
  RecordStats): for the part of a pipeline that one thread runs, under its prefetching."""

  def __init__(self, parent, stats):
    super().__init__(parent)
    self._record_stats = stats

  def __iter__(self):
    return _TimedIterator(self._parent.__iter__(), self._record_stats)


class _TimedIterator(grain.DatasetIterator):
  """Its parent's batches and state, unchanged: a checkpoint does not know it is there."""

  def __init__(self, parent, stats):
    super().__init__(parent)
    self._record_stats = stats

  def __next__(self):
    started = time.perf_counter()
    batch = next(self._parent)
    self._record_stats.add_batch_work(time.perf_counter() - started)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class UnusableDataError(ValueError):
  """Not one record of a source could be used: its pipeline would wait forever for a batch."""


def _load(source, stats: RecordStats, tokenizer=None, documents: int | None = None):
  """Index -> tokens, or None (counted) for a record that cannot be read, is empty, is not text,
  or holds ids outside the tokenizer's vocabulary.

  The pipeline reads the `documents` of its share of `source` (default: all) over and over, so
  twice as many unusable reads in a row as there are documents means none of them is usable:
  UnusableDataError then, rather than a pipeline that filters every record out forever.
  """
  tokenizer = tokenizer or tokenizers.load('')
  limit = 2 * (len(source) if documents is None else documents) + 64  # + reads out of order
  lock, unusable_in_a_row = threading.Lock(), [0]

  def load(index):
    tokens = None
    try:
      document = source[index]
      problem = None if len(document) else 'empty'
      tokens = tokenize(document, tokenizer)
    except UnicodeDecodeError as e:
      problem = f'invalid UTF-8 at byte {e.start}'
    except Exception as e:  # pylint: disable=broad-except; a bad record must not stop training
      problem = f'{type(e).__name__}: {e}'
    problem = problem and f'{source.record_name(index)}: {problem}'
    stats.count(problem)
    with lock:
      unusable_in_a_row[0] = unusable_in_a_row[0] + 1 if problem else 0
      if unusable_in_a_row[0] > limit:
        raise UnusableDataError(f'data: none of the documents of {source!r} is usable, '
                                f'e.g. {problem}')
    return None if problem else tokens

  return load


def batches(source, *, seq_len: int, batch_size: int, seed: int, shuffle: bool,
            streams: Sequence[int] = (0,), num_streams: int = 1, worker_threads: int = 0,
            prefetch_batches: int = 4, stats: RecordStats | None = None,
            tokenizer=None) -> grain.IterDataset:
  """Endless batches {'tokens', 'segment_ids', 'positions': int32[batch_size, seq_len + 1]}
  (inputs and shifted targets) of packed documents: `segment_ids` numbers each row's documents
  1, 2, ... (0: padding) and `positions` counts each one's tokens from 0. A document split
  across rows continues in the next row as segment 1, at position 0 again.

  `source`: a data.sources source, or a sources.Mixture of them (each stream then mixes its
  share of every component's documents in the mixture's proportions). `batch_size` rows are
  shared equally by `streams`, this process's streams out of `num_streams`. Text is encoded
  with `tokenizer` (default: bytes). Unusable records are skipped and counted in `stats`.
  """
  stats = stats or RecordStats()
  threads = max(1, resolve_threads(worker_threads) // len(streams))
  load = lambda s, documents: _load(s, stats, tokenizer, documents)
  ds = StreamsIterDataset({stream: _stream(
      source, stream, num_streams, seq_len=seq_len, rows=batch_size // len(streams), seed=seed,
      shuffle=shuffle, threads=threads, load=load) for stream in streams}, num_streams)
  ds = TimedIterDataset(ds, stats)
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


class StreamsIterDataset(grain.IterDataset):
  """Batches of some streams of `num_streams`, their rows side by side in the order given.

  The state is {'num_streams': N, 'streams': {stream: its position}}; restoring takes the
  positions of this dataset's streams from it and ignores the others, so the state saved by
  every process together restores on any number of processes that share the streams.
  """

  def __init__(self, streams: dict[int, grain.IterDataset], num_streams: int):
    super().__init__(list(streams.values()))
    self._stream_ids, self._num_streams = list(streams), num_streams

  def __iter__(self):
    return _StreamsIterator([p.__iter__() for p in self.parents], self._stream_ids,
                            self._num_streams)


class _StreamsIterator(grain.DatasetIterator):

  def __init__(self, parents, stream_ids, num_streams):
    super().__init__(parents)
    self._stream_ids, self._num_streams = stream_ids, num_streams

  def __next__(self):
    rows = [next(parent) for parent in self._parents]
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}

  def get_state(self):
    return {'num_streams': self._num_streams,
            'streams': {str(s): p.get_state() for s, p in zip(self._stream_ids, self._parents)}}

  def set_state(self, state):
    for stream, parent in zip(self._stream_ids, self._parents):
      parent.set_state(_slices_as_tuples(state['streams'][str(stream)]))


def _slices_as_tuples(state):
  """Grain's packing tells "no remainder" by comparing its slices with the tuple (-1, -1), and a
  state read back from JSON holds lists: the comparison fails and a restored stream would repeat
  a piece of a document. Lists under `remainder_slices` become tuples again."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in value.items()} if k == 'remainder_slices'
                else _slices_as_tuples(value)) for k, value in state.items()}
  return state


def _documents(source, stream, num_streams, *, seed, shuffle, load):
  """Every `num_streams`-th document of `source` from `stream`, endlessly, shuffled each epoch.
  `seed` is a list of ints."""
  docs = grain.MapDataset.range(len(source))[stream::num_streams]
  if not len(docs):
    raise ValueError(f'data: {source!r} has fewer documents than the {num_streams} streams: '
                     f'{_fewer_documents_fix(source)}')
  if shuffle:
    docs = docs.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
  return docs.repeat().map(load(source, len(docs)))


def _fewer_documents_fix(source) -> str:
  fewer_streams = 'set a smaller --config.data.num_streams'
  if not isinstance(source, sources.PreparedSource):
    return f'give more documents, or {fewer_streams}'
  if source.split == 'eval':
    return (f're-run python -m prepare with a larger --eval_percent, {fewer_streams}, or '
            'train without eval (--config.train.eval_every=0)')
  if source.split == 'test':
    return f're-run python -m prepare with a larger --test_percent, or {fewer_streams}'
  return f're-run python -m prepare with more documents, or {fewer_streams}'


def _stream(source, stream, num_streams, *, seq_len, rows, seed, shuffle, threads, load):
  """Batches of `rows` packed sequences from every `num_streams`-th document, from `stream`.
  A mixture's documents are interleaved by Grain's `MapDataset.mix` (a fixed pattern in the
  weights' proportions), so the stream's state stays one position."""
  if isinstance(source, sources.Mixture):
    docs = grain.MapDataset.mix([
        _documents(s, stream, num_streams, seed=[seed, stream, i], shuffle=shuffle, load=load)
        for i, (s, _) in enumerate(source.components)], [w for _, w in source.components])
  else:
    docs = _documents(source, stream, num_streams, seed=[seed, stream], shuffle=shuffle,
                      load=load)
  docs = docs.filter(lambda x: x is not None)
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  sequences = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(read_options), length_struct={'tokens': seq_len + 1})
  packed = lambda x: {'tokens': x['tokens'], 'segment_ids': x['tokens_segment_ids'],
                      'positions': x['tokens_positions']}
  return sequences.map(packed).batch(rows, drop_remainder=True)
