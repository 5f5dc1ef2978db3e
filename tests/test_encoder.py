"""The BERT-style encoder: both heads, padding never seen, bidirectional, the key mask the same on
every attention kernel, and sharding, scan and remat leaving the math unchanged."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from models import attention, byte_vocab, encoder, flops
from models.platforms import resolve_for_platform
from parallel import sharding

BATCH, LENGTH = 8, 16
LAYOUTS = {'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'fsdp4_tensor2': (1, 4, 2)}


def _cfg(**overrides):
  """A two-layer encoder with grouped-query heads (4 query heads over 2 kv heads), and a random
  classifier: the default zero one gives every input the same logits and passes no gradient
  back, which would leave the tests of head=classify nothing to compare."""
  m = encoder.default_config()
  m.update(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=32,
           dropout_rate=0.0, head_init='normal')
  m.update(overrides)
  return m


def _model(m, platform='cpu'):
  return encoder.Model(resolve_for_platform(m, platform), rngs=nnx.Rngs(params=0))


def _tokens(lengths=(16, 12, 9, 16, 5, 1, 14, 3), seed=0):
  """[CLS] then bytes 1..255, PAD after each row's length."""
  body = jax.random.randint(jax.random.key(seed), (len(lengths), LENGTH), 1, 256)
  tokens = body.at[:, 0].set(byte_vocab.CLS_ID)
  real = jnp.arange(LENGTH)[None, :] < jnp.array(lengths)[:, None]
  return jnp.where(real, tokens, byte_vocab.PAD_ID)


# Compiled: op by op, the forward pass would dispatch hundreds of small ops.
_forward = nnx.jit(lambda model, tokens: model(tokens))
_encode = nnx.jit(lambda model, tokens: model.encode(tokens))


def _real(tokens):
  return np.asarray(tokens != byte_vocab.PAD_ID)


@pytest.mark.parametrize('head, pool', [('mlm', 'cls'), ('classify', 'cls'),
                                        ('classify', 'mean')])
def test_heads_shapes_and_parameter_names(head, pool):
  m = _cfg(head=head, pool=pool, num_classes=3)
  model = _model(m)
  tokens = _tokens()
  logits = _forward(model, tokens)
  expected = (BATCH, LENGTH, m.vocab_size) if head == 'mlm' else (BATCH, 3)
  chex.assert_shape(logits, expected)
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  chex.assert_shape(_encode(model, tokens), (BATCH, LENGTH, m.embed_dim))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pooler = {'pooler'} if pool == 'cls' else set()
  heads = {'mlm': {'mlm_head'}, 'classify': {'classifier'} | pooler}
  assert set(params) == {'embed', 'positions', 'blocks', 'final_norm'} | heads[head]


def test_finetuning_loads_the_pretrained_backbone():
  """The backbone's parameters have the same paths and shapes under either head."""
  backbone = lambda m: {k: v for k, v in nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: _model(m)), nnx.Param)).items() if k not in (
          'mlm_head', 'pooler', 'classifier')}
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  chex.assert_trees_all_equal(shapes(backbone(_cfg(head='mlm'))),
                              shapes(backbone(_cfg(head='classify'))))


@pytest.mark.parametrize('attention_kind', ['cpu', 'xla'])
def test_padding_is_never_seen(attention_kind):
  """More padding, or other bytes hidden behind PAD, change nothing at the real tokens."""
  tokens = _tokens()
  longer = jnp.concatenate([tokens, jnp.zeros_like(tokens)], axis=1)  # 16 more PAD each
  for head, pool in (('mlm', 'cls'), ('classify', 'mean')):
    model = _model(_cfg(head=head, pool=pool, attention=attention_kind))
    hidden, hidden_longer = _encode(model, tokens), _encode(model, longer)[:, :LENGTH]
    real = _real(tokens)
    np.testing.assert_allclose(hidden[real], hidden_longer[real], rtol=1e-5, atol=1e-5)
    if head == 'classify':  # mean pooling ignores the padding too
      np.testing.assert_allclose(_forward(model, tokens), _forward(model, longer), rtol=1e-5,
                                 atol=1e-5)
  # Without the mask the padding would be attended to: its embedding is a real vector.
  unmasked = nnx.jit(lambda model, tokens: model.final_norm(model.blocks(
      model.embed(tokens) + model.positions[:LENGTH])))(model, tokens)
  assert not np.allclose(hidden[real], unmasked[real], atol=1e-3)
  # An all-padding example stays finite.
  chex.assert_tree_all_finite(_forward(model, jnp.zeros((2, LENGTH), jnp.int32)))


def test_encoder_is_bidirectional():
  model = _model(_cfg())
  tokens = _tokens(lengths=(LENGTH,) * BATCH)
  changed = tokens.at[:, -1].set(tokens[:, -1] % 255 + 1)  # another byte, never PAD
  hidden, hidden_changed = _encode(model, tokens), _encode(model, changed)
  assert not np.allclose(hidden[:, 0], hidden_changed[:, 0], atol=1e-4)


def _qkv_and_mask(length, batch=4, heads=4, kv_heads=2, head_dim=16):
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:])
  kept = jnp.array([length, length // 2, 3, 0])[:batch]  # the last example: all padding
  return q, k, v, jnp.arange(length)[None, :] < kept[:, None]


def _value_and_grads(fn, q, k, v):
  loss_fn = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  return jax.jit(jax.value_and_grad(loss_fn, (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('causal', [False, True])
def test_key_mask_is_the_same_on_cpu_and_xla_kernels(causal):
  q, k, v, mask = _qkv_and_mask(LENGTH)
  results = [_value_and_grads(lambda q, k, v, kind=kind: attention.attention(
      kind, q, k, v, causal=causal, kv_mask_BxL=mask), q, k, v) for kind in ('cpu', 'xla')]
  chex.assert_tree_all_finite(results)
  chex.assert_trees_all_close(*results, rtol=1e-5, atol=1e-5)
  out = attention.attention('cpu', q, k, v, causal=causal, kv_mask_BxL=mask)
  unmasked = attention.attention('cpu', q, k, v, causal=causal)
  assert not np.allclose(out[1], unmasked[1], atol=1e-3)  # the mask did something


def test_key_mask_on_splash_matches_xla_under_the_mesh():
  """Padding as segment ids, the kernel in Pallas' interpreter on the 8 CPU devices, batch and
  heads split over data x fsdp and tensor. The kernels differ only at padding queries, which
  the loss ignores as a model's loss does."""
  q, k, v, mask = _qkv_and_mask(128)
  mesh_config = _mesh_config(2, 2, 2)
  mesh = sharding.make_mesh(mesh_config)
  kernels = [lambda q, k, v: attention.splash_attention(q, k, v, causal=False,
                                                        kv_mask_BxL=mask, interpret=True),
             lambda q, k, v: attention.attention('xla', q, k, v, causal=False, kv_mask_BxL=mask)]
  loss_fn = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * mask[:, :, None, None])
  with sharding.activate(mesh, mesh_config.rules):
    results = [jax.jit(jax.value_and_grad(loss_fn(fn), (0, 1, 2)))(q, k, v) for fn in kernels]
    splash_out = jax.jit(kernels[0])(q, k, v)
  chex.assert_tree_all_finite((results, splash_out))  # the last example is all padding
  chex.assert_trees_all_close(*results, rtol=2e-5, atol=2e-5)
  assert float(results[0][0]) != 0 and float(jnp.abs(results[0][1][1]).sum()) != 0


def _mesh_config(data, fsdp, tensor):
  """The project's mesh section (its logical-axis rules included) with these sizes."""
  mesh = default.get_config('tiny').mesh
  mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return mesh


def _loss(model, tokens, labels, dropout_key=None):
  """MLM: cross-entropy at the real tokens (as if each were masked); classify: per example."""
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  logits = model(tokens, rngs=rngs)
  if model.cfg.head == 'classify':
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  real = tokens != byte_vocab.PAD_ID
  return jnp.sum(losses * real) / jnp.sum(real)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, tokens, labels, dropout_key=None):
  return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), tokens, labels,
                                            dropout_key))(params)


def _labels():
  return jnp.arange(BATCH) % 3


@pytest.mark.parametrize('layout, head', [('data8', 'mlm'), ('fsdp8', 'mlm'),
                                          ('fsdp4_tensor2', 'mlm'),
                                          ('fsdp4_tensor2', 'classify')])
def test_sharded_matches_single_device(layout, head):
  m = _cfg(head=head, num_classes=3)
  graphdef, params = nnx.split(_model(m), nnx.Param)
  tokens, labels = _tokens(), _labels()
  loss, grads = _loss_and_grads(graphdef, params, tokens, labels)
  mesh_config = _mesh_config(*LAYOUTS[layout])
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  sharded_params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
  batch = sharding.logical_sharding(mesh, rules, 'batch', 'length')
  with sharding.activate(mesh, rules):
    sharded_loss, sharded_grads = _loss_and_grads(
        graphdef, sharded_params, jax.device_put(tokens, batch), labels)
  kernel = sharded_params['blocks']['layers'][0]['mlp']['up']['kernel'][...]
  split = {'data8': (32, 64), 'fsdp8': (4, 64), 'fsdp4_tensor2': (8, 32)}[layout]
  assert kernel.addressable_shards[0].data.shape == split  # embed over fsdp, mlp over tensor
  chex.assert_trees_all_close(sharded_loss, loss, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(sharded_grads), nnx.to_pure_dict(grads),
                              rtol=1e-4, atol=1e-6)


def _stacked(pure):
  """Unscanned parameters (blocks 0..N-1) in the scanned layout (one leading layer axis)."""
  blocks = pure['blocks']['layers']
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in sorted(blocks)))
  return {**pure, 'blocks': {'layers': stacked}}


@pytest.mark.parametrize('lever', [dict(scan_layers=True), dict(remat='full'),
                                   dict(scan_layers=True, remat='full')])
def test_scan_and_remat_match_plain(lever):
  """With padding and dropout on: layer i draws the same mask scanned or not."""
  m = _cfg(dropout_rate=0.2)
  graphdef, params = nnx.split(_model(m), nnx.Param)
  tokens, labels, key = _tokens(), _labels(), jax.random.key(5)
  loss, grads = _loss_and_grads(graphdef, params, tokens, labels, key)
  lever_graphdef, lever_params = nnx.split(_model(_cfg(dropout_rate=0.2, **lever)), nnx.Param)
  pure = nnx.to_pure_dict(params)
  pure = _stacked(pure) if lever.get('scan_layers') else pure
  nnx.replace_by_pure_dict(lever_params, pure)
  lever_loss, lever_grads = _loss_and_grads(lever_graphdef, lever_params, tokens, labels, key)
  expected = nnx.to_pure_dict(grads)
  chex.assert_trees_all_close(lever_loss, loss, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(lever_grads),
                              _stacked(expected) if lever.get('scan_layers') else expected,
                              rtol=2e-5, atol=2e-6)
  no_dropout, _ = _loss_and_grads(graphdef, params, tokens, labels)
  assert abs(float(loss) - float(no_dropout)) > 1e-3  # dropout really was on


@pytest.mark.parametrize('overrides, seq_len, error', [
    (dict(head='mlm2'), 16, r"^model\.head: 'mlm2' is not one of mlm, classify"),
    (dict(head='classify', pool='max'), 16, r"^model\.pool: 'max' is not one of cls, mean"),
    (dict(head='classify', num_classes=1), 16, r'^model\.num_classes: must be at least 2'),
    (dict(vocab_size=256), 16, r'^model\.vocab_size: must hold the bytes'),
    (dict(num_heads=3), 16, r'^model\.embed_dim: 32 is not divisible'),
    (dict(), 64, r'^data\.seq_len: 64 is longer than model\.max_len=32'),
])
def test_validate_names_the_bad_key(overrides, seq_len, error):
  config = ml_collections.ConfigDict(dict(model=_cfg(**overrides),
                                          data=dict(seq_len=seq_len)))
  with pytest.raises(ValueError, match=error):
    encoder.validate(config.model, config)
  encoder.validate(_cfg(), ml_collections.ConfigDict(dict(data=dict(seq_len=32))))


def test_flops_count_the_whole_score_matrix():
  m = _cfg()
  causal = flops.attention_flops_per_token(m, 128)
  assert flops.attention_flops_per_token(m, 128, causal=False) == 2 * causal
  assert flops.train_flops_per_token(m, 128) == 6 * flops.matmul_params(m) + causal  # unchanged
  config = ml_collections.ConfigDict(dict(data=dict(seq_len=128)))
  mlm, classify = (encoder.train_flops_per_example(_cfg(head=h), config)
                   for h in ('mlm', 'classify'))
  assert mlm - classify > 128 * 6 * m.embed_dim * m.vocab_size * 0.99  # the MLM logits
