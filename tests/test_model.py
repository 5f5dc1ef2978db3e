"""The model's forward pass, loss, both styles, and that it can learn."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from models import MODELS
from models import cpu_kernels
from tasks import language_model


def _model(config):
  return MODELS[config.model.name].Model(config.model, rngs=nnx.Rngs(params=0))


def _tokens(config, batch=4, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, config.data.seq_len + 1), 0,
                            config.model.vocab_size)


@pytest.mark.parametrize('preset', ['gpt2', 'llama'])
def test_forward_shapes_and_initial_loss(preset):
  config = default.get_config(f'tiny,{preset}')
  model = _model(config)
  tokens = _tokens(config)
  logits = model(tokens[:, :-1])
  chex.assert_shape(logits, (4, config.data.seq_len, config.model.vocab_size))
  chex.assert_tree_all_finite(logits)
  loss = language_model.next_token_loss(model, tokens)
  # A freshly initialised model predicts nearly uniformly over the vocabulary.
  assert abs(float(loss) - np.log(config.model.vocab_size)) < 0.1


def test_styles_have_their_parameters(tiny_config):
  gpt2 = nnx.to_pure_dict(nnx.state(_model(default.get_config('tiny,gpt2')), nnx.Param))
  llama = nnx.to_pure_dict(nnx.state(_model(default.get_config('tiny,llama')), nnx.Param))
  assert 'positions' in gpt2 and 'unembed' not in gpt2
  assert 'positions' not in llama and 'unembed' in llama
  assert 'bias' in gpt2['blocks']['layers'][0]['mlp']['up']
  assert 'bias' not in llama['blocks']['layers'][0]['mlp']['up']
  assert 'gate' in llama['blocks']['layers'][0]['mlp']
  kv = llama['blocks']['layers'][0]['attention']['key']['kernel'].shape[1]
  q = llama['blocks']['layers'][0]['attention']['query']['kernel'].shape[1]
  assert kv * 2 == q  # grouped-query attention: half as many kv heads


def test_model_is_causal(tiny_config):
  model = _model(tiny_config)
  tokens = _tokens(tiny_config)[:, :-1]
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % tiny_config.model.vocab_size)
  np.testing.assert_allclose(model(tokens)[:, :-1], model(changed)[:, :-1], atol=1e-6)
  assert not np.allclose(model(tokens)[:, -1], model(changed)[:, -1])


def test_cpu_dense_matches_plain_dot_general():
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  w = jax.random.normal(jax.random.key(1), (8, 6))
  dims = (((2,), (0,)), ((), ()))
  plain = lambda x, w: jnp.sum(jnp.sin(jax.lax.dot_general(x, w, dims)))
  fast = lambda x, w: jnp.sum(jnp.sin(cpu_kernels.dot_general(x, w, dims)))
  np.testing.assert_allclose(fast(x, w), plain(x, w), rtol=1e-6)
  for g_fast, g_plain in zip(jax.grad(fast, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(g_fast, g_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('preset', ['gpt2', 'llama'])
def test_tiny_model_overfits_one_batch(preset):
  config = default.get_config(f'tiny,{preset}')
  model = _model(config)
  tokens = _tokens(config, batch=2)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def update(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: language_model.next_token_loss(nnx.merge(graphdef, p), tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(150):
    params, opt_state, loss = update(params, opt_state)
    first = loss if first is None else first
  assert float(first) > 5.0 and float(loss) < 0.2
