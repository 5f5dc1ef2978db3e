"""Masked-language-model pretraining of an encoder (task.name='mlm'), BERT style.

Any text source the LM job reads (default: the Python standard library's own source) is cut
into pieces of `data.seq_len - 1` bytes behind a [CLS] token; about `data.mask_rate` of the
bytes are chosen, of which 80% become [MASK], 10% a random byte and 10% stay (data/mlm.py).
Batches are {'inputs', 'targets': int32 [B, L], 'weights': float32 [B, L]} (weights 1 where a
byte was chosen); eval batches also carry 'mask' [B]. The loss is the cross-entropy at the
chosen positions; eval reports it with the accuracy of the predicted bytes there. With
`data.tokenizer` a tokenizer.json (BERT's), pieces are its tokens between [CLS] and [SEP], and
its own [MASK] and [PAD] are used (data/tokenizers.py's Vocabulary). The validation split is
evaluated every `train.eval_every` steps (eval/*) and the test split, when the source has one
(data/sources.py), once at the end (test/*), each on a fixed sample of `task.eval_batches`
global batches.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from data import mlm, sources, tokenizers
from tasks import base, language_model

_EVAL_SEED = 20_251_129


def default_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = 'mlm'
  t.eval_batches = 8  # global batches in the fixed, seeded eval sample
  return t


CHOICES = language_model.CHOICES


def default_data_config() -> ml_collections.ConfigDict:
  d = language_model.default_data_config()
  del d['num_streams']  # every process reads the whole stream and keeps its rows
  d.mask_rate = 0.15
  return d


class Task(base.Task):
  unit = 'tokens'
  larger_is_better = ('accuracy',)

  def validate(self):
    d = self.config.data
    _require(self.config.model.get('head') == 'mlm', 'model.head',
             f'task.name=mlm needs an encoder with head=mlm, got model.name='
             f'{self.config.model.name!r}')
    size = self.vocab.size  # ValueError naming data.tokenizer
    _require(self.config.model.vocab_size >= size, 'model.vocab_size',
             f'{self.config.model.vocab_size} < {size}: the ids of '
             f'{d.tokenizer or "bytes and special tokens"}')
    raw = [name for name in sources.SOURCES if name != 'arrayrecord']  # text, not token ids
    _require(d.source in raw, 'data.source', f'{d.source!r} is not one of {", ".join(raw)}')
    sources.refuse_renamed(d)
    sources.SOURCES.check(d)
    sources.SOURCES.validate(d)
    _require(d.seq_len > 1, 'data.seq_len', f'must be > 1, got {d.seq_len}')
    _require(0 < d.mask_rate < 1, 'data.mask_rate', f'must be in (0, 1), got {d.mask_rate}')
    _require(self.config.task.eval_batches >= 0, 'task.eval_batches', 'must be >= 0')

  @functools.cached_property
  def vocab(self) -> tokenizers.Vocabulary:
    return tokenizers.Vocabulary(self.config.data.tokenizer)

  def batch_spec(self, split):
    d = self.config.data
    shape = (d.global_batch_size, d.seq_len)
    spec = {'inputs': base.Field(shape, jnp.int32, ('batch', 'length')),
            'targets': base.Field(shape, jnp.int32, ('batch', 'length')),
            'weights': base.Field(shape, jnp.float32, ('batch', 'length'))}
    if split == 'eval':
      spec['mask'] = base.Field((d.global_batch_size,), jnp.float32, ('batch',))
    return spec

  def units_per_example(self):
    return self.config.data.seq_len

  def _losses(self, model, batch, rngs=None):
    logits_BxLxV = model(batch['inputs'], train=rngs is not None, rngs=rngs)
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
    hits_BxL = jnp.argmax(logits_BxLxV, -1) == batch['targets']
    return losses_BxL, hits_BxL

  def loss(self, model, batch, rngs):
    losses_BxL, hits_BxL = self._losses(model, batch, rngs)
    weights = batch['weights']
    total = jnp.maximum(weights.sum(), 1.0)
    return (losses_BxL * weights).sum() / total, {'accuracy': (hits_BxL * weights).sum() / total}

  def eval_sums(self, model, batch):
    losses_BxL, hits_BxL = self._losses(model, batch)
    weights = batch['weights'] * batch['mask'][:, None]
    return {'loss_sum': (losses_BxL * weights).sum(), 'hits': (hits_BxL * weights).sum(),
            'count': weights.sum()}

  def eval_metrics(self, sums):
    count = max(float(sums['count']), 1.0)
    return {'loss': float(sums['loss_sum']) / count, 'accuracy': float(sums['hits']) / count}

  def train_batches(self, stats):
    d = self.config.data
    return mlm.mlm_batches(
        sources.make_source(d, 'train'), seq_len=d.seq_len, global_batch_size=d.global_batch_size,
        seed=d.shuffle_seed, mask_rate=d.mask_rate, process_index=jax.process_index(),
        process_count=jax.process_count(), stats=stats, worker_threads=d.worker_threads,
        prefetch_batches=d.prefetch_batches, vocab=self.vocab)

  def split_batches(self, split):
    d = self.config.data
    if not self.config.task.eval_batches:
      return []
    return mlm.mlm_eval_batches(
        sources.make_source(d, split), seq_len=d.seq_len, global_batch_size=d.global_batch_size,
        num_batches=self.config.task.eval_batches, seed=_EVAL_SEED, mask_rate=d.mask_rate,
        process_index=jax.process_index(), process_count=jax.process_count(), vocab=self.vocab)


def _require(ok, key, message):
  if not ok:
    raise ValueError(f'{key}: {message}')
