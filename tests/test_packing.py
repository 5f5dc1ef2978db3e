"""Packed documents: no token sees another document, on every attention kernel, and the loss
leaves out the targets that start a document."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from models import MODELS, attention
from parallel import sharding
from tasks import language_model
from tests.test_encoder import _mesh_config, _value_and_grads  # pylint: disable=protected-access
from tests.test_sharding import packed_batch

LENGTH = 128  # the splash kernel tiles 128 tokens; shorter rows would take XLA's path
DOC = 60  # the document whose logits must not depend on what is packed before it


def _model(kind, style, monkeypatch):
  config = default.get_config(f'tiny,{style}')
  config.model.update(attention=kind, max_len=LENGTH)
  if kind == 'splash':  # Pallas' interpreter runs the TPU kernel on the CPU
    monkeypatch.setattr(attention, 'splash_attention',
                        functools.partial(attention.splash_attention, interpret=True))
  return MODELS['transformer'].Model(config.model, rngs=nnx.Rngs(params=0))


def _row(before, doc, rng):
  """A packed row: a document of `before` random tokens, `doc`, then another document."""
  after = LENGTH - before - len(doc)
  tokens = np.concatenate([rng.integers(1, 256, before), doc, rng.integers(1, 256, after)])
  starts = np.zeros(LENGTH, bool)
  starts[[before, before + len(doc)]] = True
  return tokens.astype(np.int32), starts


@pytest.mark.parametrize('style', ['gpt2', 'llama'])  # learned positions; rotary and GQA
@pytest.mark.parametrize('kind', ['cpu', 'xla', 'splash'])
def test_logits_do_not_depend_on_the_documents_packed_before(kind, style, monkeypatch):
  rng = np.random.default_rng(0)
  doc = rng.integers(1, 256, DOC).astype(np.int32)
  rows = [_row(30, doc, rng), _row(50, doc, rng)]
  batch = packed_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
  model = _model(kind, style, monkeypatch)
  logits = nnx.jit(lambda model, b: model(b['tokens'], segment_ids_BxL=b['segment_ids'],
                                          positions_BxL=b['positions']))(model, batch)
  alone = model(jnp.asarray(doc[None]))[0]  # the document unpacked, at the start of a row
  np.testing.assert_allclose(logits[0, 30:30 + DOC], alone, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(logits[1, 50:50 + DOC], alone, atol=2e-5, rtol=2e-5)
  unmasked = model(jnp.asarray(batch['tokens']))
  assert not np.allclose(unmasked[0, 30:30 + DOC], alone, atol=1e-3)  # packing mattered


def _qkv_and_ids(length, heads=4, kv_heads=2, batch=2, seed=0):
  q, k, v = (jax.random.normal(key, (batch, length, h, 8)) for key, h in
             zip(jax.random.split(jax.random.key(seed), 3), (heads, kv_heads, kv_heads)))
  rng = np.random.default_rng(seed)
  ids = packed_batch(np.zeros((batch, length), np.int32), rng.random((batch, length)) < 0.1)
  return q, k, v, jnp.asarray(ids['segment_ids'])


@pytest.mark.parametrize('causal', [False, True])
def test_segments_are_the_same_on_cpu_and_xla_kernels_with_and_without_padding(causal):
  q, k, v, ids = _qkv_and_ids(24)
  pad = jnp.arange(24)[None, :] < jnp.asarray([[24], [17]])  # the second row ends in padding
  for kv_mask in (None, pad):
    kernel = lambda kind: lambda q, k, v: attention.attention(
        kind, q, k, v, causal=causal, kv_mask_BxL=kv_mask, segment_ids_BxL=ids)
    results = [_value_and_grads(kernel(kind), q, k, v) for kind in ('cpu', 'xla')]
    chex.assert_trees_all_close(*results, rtol=1e-5, atol=1e-5)
  first = int(np.argmax(np.asarray(ids[0]) != 1))  # row 0's first document ends here
  alone = attention.attention('cpu', q[:1, :first], k[:1, :first], v[:1, :first], causal=causal)
  together = attention.attention('cpu', q, k, v, causal=causal, segment_ids_BxL=ids)
  np.testing.assert_allclose(together[:1, :first], alone, atol=1e-5)


def test_cudnn_gets_a_segment_mask_spanning_every_query_and_key(monkeypatch):
  """cuDNN cannot run here: check what it is given (a boolean [B, 1, L, L], which cuDNN turns
  into a bias, plus its causal mode) and that XLA computes the same from those arguments."""
  q, k, v, ids = _qkv_and_ids(16)
  pad = jnp.arange(16)[None, :] < jnp.asarray([[16], [11]])
  calls = []
  plain = jax.nn.dot_product_attention

  def record(*args, **kwargs):
    calls.append(kwargs)
    return plain(*args, **{**kwargs, 'implementation': 'xla'})

  monkeypatch.setattr(jax.nn, 'dot_product_attention', record)
  out, mask = jax.jit(lambda q, k, v: (attention.attention(
      'cudnn', q, k, v, kv_mask_BxL=pad, segment_ids_BxL=ids), calls[-1]['mask']))(q, k, v)
  (kwargs,) = calls
  assert kwargs['implementation'] == 'cudnn' and kwargs['is_causal']
  assert set(kwargs) == {'implementation', 'is_causal', 'mask'}  # no key counts
  assert mask.shape == (2, 1, 16, 16) and mask.dtype == jnp.bool_
  folded = np.where(pad, ids, 0)
  np.testing.assert_array_equal(mask[:, 0], folded[:, :, None] == folded[:, None, :])
  monkeypatch.undo()
  reference = jax.jit(lambda q, k, v: attention.attention(
      'cpu', q, k, v, kv_mask_BxL=pad, segment_ids_BxL=ids))(q, k, v)
  np.testing.assert_allclose(out * pad[..., None, None], reference * pad[..., None, None],
                             atol=1e-5)


def test_segments_on_splash_match_xla_under_the_mesh():
  """The kernel in Pallas' interpreter on the 8 CPU devices, batch and heads split."""
  q, k, v, ids = _qkv_and_ids(128, batch=4)
  mesh_config = _mesh_config(2, 2, 2)
  mesh = sharding.make_mesh(mesh_config)
  kernels = [lambda q, k, v: attention.splash_attention(q, k, v, segment_ids_BxL=ids,
                                                        interpret=True),
             lambda q, k, v: attention.attention('xla', q, k, v, segment_ids_BxL=ids)]
  with sharding.activate(mesh, mesh_config.rules):
    results = [_value_and_grads(fn, q, k, v) for fn in kernels]
  chex.assert_trees_all_close(*results, rtol=2e-5, atol=2e-5)


def test_loss_and_eval_sums_leave_out_targets_that_start_a_document():
  config = default.get_config('tiny')
  rng = np.random.default_rng(0)
  shape = (4, config.data.seq_len + 1)
  batch = packed_batch(rng.integers(1, 256, shape, dtype=np.int32), rng.random(shape) < 0.1)
  starts = batch['segment_ids'][:, 1:] != batch['segment_ids'][:, :-1]
  np.testing.assert_array_equal(language_model.target_weights(batch['segment_ids']), ~starts)
  task = language_model.Task(config, MODELS['transformer'])
  model = lambda: MODELS['transformer'].Model(config.model, rngs=nnx.Rngs(params=0))
  loss = nnx.jit(lambda model, batch: task.loss(model, batch, None)[0])
  losses = nnx.jit(lambda model, batch: language_model.next_token_loss(
      model, batch['tokens'], per_token=True, segment_ids_BxL1=batch['segment_ids'],
      positions_BxL1=batch['positions']))(model(), batch)
  assert starts.any() and not np.isclose(losses[~starts].mean(), losses.mean(), rtol=1e-4)
  sums = nnx.jit(task.eval_sums)(model(), batch)  # the mean over the targets counted
  assert float(sums['tokens']) == (~starts).sum()
  np.testing.assert_allclose(task.eval_metrics(sums)['loss'], losses[~starts].mean(), rtol=1e-5)
  expected = losses[~starts].sum() / losses.size  # training: over all targets (accumulation)
  np.testing.assert_allclose(loss(model(), batch), expected, rtol=1e-5)
  config.model.loss_chunk = 8  # the chunked loss: the same
  np.testing.assert_allclose(loss(model(), batch), expected, rtol=1e-5)
