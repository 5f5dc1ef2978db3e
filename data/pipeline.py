"""Grain pipeline: source -> shard -> shuffle -> repeat -> tokenize -> pack -> batch -> prefetch.

The order is a pure function of the seed and the shard, and the iterator's state is small and
saved with each checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

import grain
import numpy as np

DOCUMENT_SEPARATOR = 0  # a byte that never occurs in text; ends every document


def tokenize(document: bytes) -> dict[str, np.ndarray]:
  """Bytes -> token ids 0..255, with the separator appended."""
  tokens = np.frombuffer(document, dtype=np.uint8).astype(np.int32)
  return {'tokens': np.append(tokens, np.int32(DOCUMENT_SEPARATOR))}


def batches(source, *, seq_len: int, batch_size: int, seed: int, shuffle: bool,
            shard_index: int = 0, shard_count: int = 1, worker_threads: int = 2,
            prefetch_batches: int = 4) -> grain.IterDataset:
  """Endless batches {'tokens': int32[batch_size, seq_len + 1]} (inputs and shifted targets).

  Each shard (one per process) reads only its own documents.
  """
  docs = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    docs = docs.shuffle(seed=seed)
  docs = docs.repeat().map(tokenize)
  read_options = grain.ReadOptions(num_threads=worker_threads,
                                   prefetch_buffer_size=4 * worker_threads)
  sequences = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(read_options), length_struct={'tokens': seq_len + 1})
  ds = sequences.map(lambda x: {'tokens': x['tokens']}).batch(batch_size, drop_remainder=True)
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds
