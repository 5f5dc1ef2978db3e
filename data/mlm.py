"""BERT-style masked-language-model batches from any document source (data.sources).

Token ids as in data/tokenizers.py: bytes, or a tokenizer's (`vocab`, a Vocabulary).
`mlm_batches` is the endless, resumable training stream and `mlm_eval_batches` a fixed, seeded
eval sample; both give each process its rows of every global batch, masked per example, so
neither depends on the number of processes.
"""

import grain
import numpy as np

from data import pipeline
from data.tokenizers import Vocabulary

_BYTES = Vocabulary()


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, mask_rate: float = 0.15,
                vocab: Vocabulary = _BYTES):
  """BERT's masking of one row: (inputs, targets, weights).

  round(mask_rate * n) of the row's n tokens (at least one; never CLS, SEP or PAD) are chosen;
  of those 80% become MASK, 10% a random token (a byte, or a non-special id), 10% stay.
  Targets hold the chosen tokens, else PAD.
  """
  candidates = np.flatnonzero((ids != vocab.pad) & (ids != vocab.cls) & (ids != vocab.sep))
  count = min(len(candidates), max(1, round(len(candidates) * mask_rate)))
  chosen = rng.choice(candidates, count, replace=False)
  action = rng.random(count)
  inputs = ids.copy()
  inputs[chosen[action < 0.8]] = vocab.mask
  replaced = chosen[(action >= 0.8) & (action < 0.9)]
  inputs[replaced] = rng.integers(*vocab.random_ids, len(replaced))
  targets = np.full_like(ids, vocab.pad)
  targets[chosen] = ids[chosen]
  weights = np.zeros(ids.shape, np.float32)
  weights[chosen] = 1
  return inputs, targets, weights


def _mask_rows(ids, first_example, seed, mask_rate, vocab):
  """Masks each row from its own generator, seeded by (seed, example index): the same masks
  whichever process masks it, and again after a restore."""
  rows = [mask_tokens(row, np.random.default_rng([seed, first_example + i]), mask_rate, vocab)
          for i, row in enumerate(ids)]
  inputs, targets, weights = (np.stack(x) for x in zip(*rows))
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


class _Chunks(grain.experimental.FlatMapTransform):
  """A document (pipeline tokens) -> all its pieces of at most `size` bytes."""

  max_fan_out = 1 << 30  # read only by MapDataset flat maps; documents may be any length

  def __init__(self, size):
    self._size = size

  def flat_map(self, element):
    tokens = element['tokens'][:-1]  # drop the separator the LM pipeline appends
    return [tokens[i:i + self._size] for i in range(0, len(tokens), self._size)]


def _process_rows(global_batch_size, process_index, process_count) -> slice:
  if global_batch_size % process_count:
    raise ValueError(f'data.global_batch_size: {global_batch_size} does not split evenly over '
                     f'{process_count} processes')
  rows = global_batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


def mlm_batches(documents, *, seq_len: int, global_batch_size: int, seed: int,
                mask_rate: float = 0.15, process_index: int = 0, process_count: int = 1,
                shuffle: bool = True, stats: pipeline.RecordStats | None = None,
                shuffle_window: int = 4096, worker_threads: int = 0,
                prefetch_batches: int = 4, vocab: Vocabulary = _BYTES) -> grain.IterDataset:
  """Endless masked-LM batches: this process's rows of each global batch.

  Each row is CLS and one piece (up to seq_len - 1 bytes) of a document, PAD-padded; every
  piece of every document is used. {'inputs', 'targets': int32[b, seq_len], 'weights':
  float32[b, seq_len]} with b = global_batch_size / process_count; process p gets rows
  p*b..(p+1)*b-1. Every process reads the whole global stream (text is a few hundred KiB per
  step) and masks only its rows, so global batches never depend on the process count.
  Documents are reshuffled each epoch, pieces within `shuffle_window`-piece windows; masks
  differ each epoch. Unusable documents are skipped and counted in `stats`.
  """
  rows = _process_rows(global_batch_size, process_index, process_count)
  docs = grain.MapDataset.range(len(documents))
  if shuffle:
    docs = docs.shuffle(seed=seed)
  # The LM pipeline's reader: the same checks, counted the same way.
  stats = stats or pipeline.RecordStats()
  load = pipeline._load(documents, stats, vocab.tokenizer)  # pylint: disable=protected-access
  docs = docs.repeat().map(load)
  threads = pipeline.resolve_threads(worker_threads)
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  pieces = grain.experimental.FlatMapIterDataset(
      docs.filter(lambda d: d is not None).to_iter_dataset(read_options),
      _Chunks(vocab.body_len(seq_len)))
  if shuffle:
    pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=shuffle_window,
                                                          seed=seed)
  ds = pieces.map(lambda piece: vocab.row(piece, seq_len)).batch(global_batch_size)
  ds = ds.map_with_index(lambda step, ids: _mask_rows(
      ids[rows], step * global_batch_size + rows.start, seed, mask_rate, vocab))
  ds = pipeline.TimedIterDataset(ds, stats)
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def _eval_pieces(documents, size, wanted, seed, stats, tokenizer):
  """`wanted` pieces (fewer if the documents run out) spread over as many documents as possible:
  documents in a seeded order, one random piece of each, then a second of each, and so on."""
  load = pipeline._load(documents, stats, tokenizer)  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  per_document = []
  for index in rng.permutation(len(documents)):
    if len(per_document) == wanted:
      break
    document = load(int(index))
    if document is not None:
      pieces = _Chunks(size).flat_map(document)
      per_document.append([pieces[i] for i in rng.permutation(len(pieces))])
  rounds = max(map(len, per_document), default=0)
  spread = [p[r] for r in range(rounds) for p in per_document if r < len(p)]
  return spread[:wanted]


def mlm_eval_batches(documents, *, seq_len: int, global_batch_size: int, num_batches: int,
                     seed: int, mask_rate: float = 0.15, process_index: int = 0,
                     process_count: int = 1, stats: pipeline.RecordStats | None = None,
                     vocab: Vocabulary = _BYTES) -> list[dict]:
  """A fixed masked-LM eval set: this process's rows of `num_batches` global batches.

  The pieces and their masks depend only on the documents and `seed`. Batches are as in
  `mlm_batches` plus 'mask': float32[b], 0 for padding rows when the documents run out.
  """
  rows = _process_rows(global_batch_size, process_index, process_count)
  pieces = _eval_pieces(documents, vocab.body_len(seq_len), num_batches * global_batch_size,
                        seed, stats or pipeline.RecordStats(), vocab.tokenizer)
  batches = []
  for first in range(0, num_batches * global_batch_size, global_batch_size):
    mine = pieces[first + rows.start:first + rows.stop]
    ids = np.zeros((rows.stop - rows.start, seq_len), np.int32)  # padding rows: no bytes to mask
    for i, piece in enumerate(mine):
      ids[i] = vocab.row(piece, seq_len)
    batch = _mask_rows(ids, first + rows.start, seed, mask_rate, vocab)
    batch['mask'] = (np.arange(len(ids)) < len(mine)).astype(np.float32)
    batches.append(batch)
  return batches
