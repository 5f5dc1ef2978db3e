"""Causal language modelling: predict each next token of packed documents (task.name='lm').

Batches are {'tokens', 'segment_ids', 'positions'}, each int32 [B, L + 1]: inputs are
tokens[:, :-1], targets tokens[:, 1:]. Tokens are bytes by default, or those of
`data.tokenizer` or of the prepared dataset (`data.source=arrayrecord`). A row packs documents
end to end, each ended by the tokenizer's eos; `segment_ids` numbers a row's documents 1, 2, ...
(0: padding) and `positions` counts each document's tokens from 0 (a document split across rows
starts again at 0 in the next row, as a document of its own). A token attends only to the
earlier tokens of its own document, so its prediction never depends on the documents packed
before it. A target that starts a document (its input is the previous document's eos) cannot be
predicted from its document, so it is left out (`target_weights`): one target per document. The
eval loss is the mean over the targets counted; the training loss is their sum over all B * L
targets, so that gradient accumulation's micro-batches, which count different numbers, average
to the whole batch's loss exactly. It is lower than the counted mean by the share of targets
left out (1 / the mean document length: 0.1% for 1000-token documents).
Evaluation is a fixed, seeded sample of packed sequences drawn from every document of a split
(`task.eval_batches` global batches; for a mixture, from the components' splits mixed in the
training weights), reported as loss per token and bits per byte: each target token counts
the UTF-8 bytes it stands for (1 for every byte token; eos counts 1, as the byte separator did).
The validation split is evaluated every `train.eval_every` steps (eval/*) and the test split,
when the source has one (data/sources.py), once at the end (test/*).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import pipeline, sources, tokenizers
from parallel import sharding
from tasks import base

PACKED_KEYS = ('tokens', 'segment_ids', 'positions')  # a batch's keys (pipeline.batches)
_EVAL_SEED = 20_251_128  # the eval sample's shuffle: fixed, unlike the training seed


def default_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = 'lm'
  t.eval_batches = 16  # global batches in the eval sample
  t.num_samples = 3  # text samples printed at the end of training
  t.sample_length = 160
  t.sample_temperature = 0.8  # 0: greedy (the most likely byte each time)
  t.sample_top_k = 0  # > 0: draw from the k most likely bytes only
  t.sample_top_p = 1.0  # < 1: draw from the smallest set of bytes this likely (nucleus)
  t.sample_prompts = ('def ', 'import ', 'class ')
  return t


CHOICES = (sources.SOURCES,)  # the data section's registered choices


def default_data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  sources.SOURCES.declare(d, 'stdlib')
  # Raw text's tokenizer: '' (bytes) or a SentencePiece .model or Hugging Face tokenizer.json
  # (local or gs://). Empty for arrayrecord, which uses the prepared dataset's own.
  d.tokenizer = ''
  d.seq_len = 128
  d.global_batch_size = 32
  d.shuffle_seed = 0
  # Documents are dealt into this many streams, each owned by one process (0: one per process).
  # Fix it (to a multiple of every process count you use) to resume a checkpoint on another
  # number of hosts with the same batches; a count that cannot is refused at restore.
  d.num_streams = 0
  d.max_bad_fraction = 0.01  # stop if more of the records read are unusable (checked after 100)
  d.warn_wait_share = 0.05  # warn when training waits for data more of the time than this
  d.worker_threads = 0  # threads that read and tokenise documents (0: half the CPUs, <= 16)
  d.prefetch_batches = 4
  return d


def target_weights(segment_ids_BxL1):
  """1.0 for a target [B, L] of the same document as its input, else 0.0 (a target that starts
  a document, or padding); all ones without segment ids."""
  if segment_ids_BxL1 is None:
    return None
  same_BxL = segment_ids_BxL1[:, 1:] == segment_ids_BxL1[:, :-1]
  return (same_BxL & (segment_ids_BxL1[:, 1:] != 0)).astype(jnp.float32)


def next_token_loss(model, tokens_BxL1, rngs=None, *, segment_ids_BxL1=None,
                    positions_BxL1=None, per_token=False):
  """Cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], summed over the targets
  `target_weights` counts, over all B * L targets (or, with `per_token`, the [B, L] losses,
  uncounted ones included).
  `segment_ids_BxL1`, `positions_BxL1`: the packed documents (None: each row is one).
  `rngs` turns dropout on.

  With `model.cfg.loss_chunk` > 0 the logits exist only `loss_chunk` positions at a time.
  """
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  inputs = dict(segment_ids_BxL=_drop_last(segment_ids_BxL1),
                positions_BxL=_drop_last(positions_BxL1), rngs=rngs)
  weights_BxL = target_weights(segment_ids_BxL1)
  if weights_BxL is None:
    weights_BxL = jnp.ones(targets_BxL.shape, jnp.float32)
  chunk = model.cfg.loss_chunk
  if not chunk or per_token:
    logits_BxLxV = model(inputs_BxL, **inputs)
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    return losses_BxL if per_token else (losses_BxL * weights_BxL).sum() / losses_BxL.size
  total = _chunked_sum(model, model.hidden(inputs_BxL, **inputs), targets_BxL, weights_BxL, chunk)
  return total / targets_BxL.size


def _drop_last(x_BxL1):
  return None if x_BxL1 is None else x_BxL1[:, :-1]


def _chunked_sum(model, x_BxLxD, targets_BxL, weights_BxL, chunk):
  """The cross-entropy summed over the weighted targets, in chunks of `chunk` positions,
  scanned: each chunk's [B, C, V] logits are made, reduced to a sum and dropped, then remade in
  the backward pass."""
  b, l, d = x_BxLxD.shape
  x_NxBxCxD = x_BxLxD.reshape(b, l // chunk, chunk, d).swapaxes(0, 1)
  x_NxBxCxD = sharding.constrain(x_NxBxCxD, None, 'batch', 'length', 'embed')
  by_chunk = lambda y_BxL: y_BxL.reshape(b, l // chunk, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sum(x_BxCxD, targets_BxC, weights_BxC):
    logits_BxCxV = model.logits(x_BxCxD)
    losses_BxC = optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV, targets_BxC)
    return (losses_BxC * weights_BxC).sum()

  def add_chunk(total, xs):
    return total + chunk_sum(*xs), None

  xs = (x_NxBxCxD, by_chunk(targets_BxL), by_chunk(weights_BxL))
  total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), xs)
  return total


class Task(base.Task):
  """Next-token prediction with a decoder (`model.name=transformer`)."""
  unit = 'tokens'

  def validate(self):
    d = self.config.data
    sources.refuse_renamed(d)
    sources.SOURCES.check(d)
    sources.SOURCES.validate(d)
    vocab_size = self.tokenizer.vocab_size  # ValueError: no dataset.json, no tokenizer
    _require(self.config.model.vocab_size >= vocab_size, 'model.vocab_size',
             f"{self.config.model.vocab_size} is smaller than the tokenizer's {vocab_size} "
             f'tokens ({self.tokenizer.spec})')
    _require(d.seq_len > 0, 'data.seq_len', f'must be positive, got {d.seq_len}')
    t = self.config.task
    for key in ('eval_batches', 'num_samples', 'sample_length'):
      _require(t[key] >= 0, f'task.{key}', f'must be >= 0, got {t[key]}')
    _require(t.sample_temperature >= 0, 'task.sample_temperature', 'must be >= 0 (0: greedy)')
    _require(0 <= t.sample_top_k <= self.config.model.vocab_size, 'task.sample_top_k',
             'must be in [0, model.vocab_size] (0: off)')
    _require(0 < t.sample_top_p <= 1, 'task.sample_top_p', 'must be in (0, 1] (1: off)')
    _require(not t.num_samples or bool(t.sample_prompts), 'task.sample_prompts',
             'is empty but task.num_samples > 0')

  def validate_processes(self, num_processes):
    d = self.config.data  # streams are owned by one process each
    streams = d.num_streams or num_processes
    _require(streams >= 0 and streams % num_processes == 0, 'data.num_streams',
             f'{d.num_streams} streams cannot be shared by {num_processes} processes')
    _require(d.global_batch_size % streams == 0, 'data.global_batch_size',
             f'{d.global_batch_size} is not divisible by {streams} data streams')

  def batch_spec(self, split):
    d = self.config.data
    field = base.Field((d.global_batch_size, d.seq_len + 1), jnp.int32, ('batch', 'length'))
    return {key: field for key in PACKED_KEYS}

  def units_per_example(self):
    return self.config.data.seq_len

  def loss(self, model, batch, rngs):
    return next_token_loss(model, batch['tokens'], rngs, **_packing(batch)), {}

  @functools.cached_property
  def tokenizer(self):
    """The run's tokenizer (data.tokenizer, or the prepared dataset's own)."""
    return load_tokenizer(self.config.data)

  @functools.cached_property
  def _bytes_per_token(self):
    """float32[model.vocab_size]: the UTF-8 bytes each token id stands for (eos: 1)."""
    table = np.zeros(self.config.model.vocab_size, np.float32)
    table[:self.tokenizer.vocab_size] = token_byte_lengths(self.tokenizer)
    return table

  def eval_sums(self, model, batch):
    losses_BxL = next_token_loss(model, batch['tokens'], per_token=True, **_packing(batch))
    weights_BxL = target_weights(batch['segment_ids'])
    bytes_BxL = jnp.asarray(self._bytes_per_token)[batch['tokens'][:, 1:]]
    return {'loss_sum': (losses_BxL * weights_BxL).sum(), 'tokens': weights_BxL.sum(),
            'bytes': (bytes_BxL * weights_BxL).sum()}

  def eval_metrics(self, sums):
    tokens = max(float(sums['tokens']), 1.0)
    loss = float(sums['loss_sum']) / tokens
    return {'loss': loss,
            'bits_per_byte': loss / math.log(2) * (tokens / max(float(sums['bytes']), 1.0))}

  def train_batches(self, stats):
    source = sources.make_source(self.config.data, 'train')  # ValueError: no files, no dataset
    return _batches(self.config.data, source, shuffle=True, seed=self.config.data.shuffle_seed,
                    stats=stats, tokenizer=self.tokenizer)

  def split_batches(self, split):
    """A fixed sample: `split`'s documents shuffled with a fixed seed, packed, the first
    `task.eval_batches` batches."""
    if not self.config.task.eval_batches:
      return []
    source = sources.make_source(self.config.data, split)
    iterator = iter(_batches(self.config.data, source, shuffle=True, seed=_EVAL_SEED,
                             tokenizer=self.tokenizer))
    out = [next(iterator) for _ in range(self.config.task.eval_batches)]
    iterator.close()
    return out

  def parts(self, run):
    from tasks import lm_samples  # pylint: disable=g-import-not-at-top
    if not self.config.task.num_samples:
      return []
    return [lm_samples.Samples(self.config, self.tokenizer)]


def _packing(batch) -> dict:
  return {'segment_ids_BxL1': batch['segment_ids'], 'positions_BxL1': batch['positions']}


def one_document_per_row(tokens_BxL1) -> dict:
  """The batch of rows that are each one whole document at positions 0 .. L (for tests and
  benchmarks that make up tokens): no mask beyond causal, every target counted."""
  tokens_BxL1 = np.asarray(tokens_BxL1)
  b, l1 = tokens_BxL1.shape
  return {'tokens': tokens_BxL1, 'segment_ids': np.ones((b, l1), np.int32),
          'positions': np.broadcast_to(np.arange(l1, dtype=np.int32), (b, l1))}


def _require(ok, key, message):
  if not ok:
    raise ValueError(f'{key}: {message}')


def load_tokenizer(d):
  """The tokenizer of data config `d`: data.tokenizer, or the prepared datasets' own."""
  spec = sources.tokenizer_spec(d)  # ValueError naming the key
  try:
    return tokenizers.load(spec)
  except ValueError as e:  # 'data.tokenizer: ...'; name the key the spec came from
    if d.tokenizer:
      raise
    key = 'data.mixture' if d.mixture else 'data.path'
    raise ValueError(f'{key}: the dataset\'s tokenizer: {str(e).split(": ", 1)[-1]}') from None


def token_byte_lengths(tokenizer) -> np.ndarray:
  """float32[vocab_size]: the UTF-8 bytes each token id stands for, eos counted as 1. Read from
  what decoding adds after a plain token, so a leading space counts; a piece of a multi-byte
  character (decoded alone as U+FFFD) counts as one byte; special tokens other than eos as 0."""
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return np.ones(tokenizer.vocab_size, np.float32)
  prefix = [int(i) for i in tokenizer.encode('a')]
  base = tokenizer.decode(prefix)
  lengths = np.zeros(tokenizer.vocab_size, np.float32)
  for i in range(tokenizer.vocab_size):
    text = tokenizer.decode(prefix + [i])
    pieces = text.count('\ufffd') - base.count('\ufffd')
    lengths[i] = len(text.encode()) - len(base.encode()) - 2 * pieces
  lengths[tokenizer.eos_id] = 1
  return lengths


def _batches(d, source, *, shuffle, seed, stats=None, tokenizer=None):
  """This process's rows of each global batch: those of the data streams it owns."""
  num_streams = d.num_streams or jax.process_count()
  per_process = num_streams // jax.process_count()
  first = jax.process_index() * per_process
  return pipeline.batches(
      source, seq_len=d.seq_len, batch_size=d.global_batch_size // jax.process_count(),
      seed=seed, shuffle=shuffle, streams=range(first, first + per_process),
      num_streams=num_streams, worker_threads=d.worker_threads,
      prefetch_batches=d.prefetch_batches, stats=stats, tokenizer=tokenizer)
