"""Memory levers change what is stored and compiled, never the math: layer scan, remat
policies, chunked loss and bfloat16 give the losses and gradients of the plain model."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from configs import default
from jax.sharding import NamedSharding

from models import MODELS, attention
from models.platforms import resolve_for_platform
from hardware import tpu_slices
from parallel import sharding
from tests import test_sharding
from training import config_check
from training import state as state_lib
from tasks import base, language_model
from training import step as step_lib


def _config(preset='tiny,llama', **model):
  config = default.get_config(preset)
  config.model.update(model)
  return config


def _split(config, platform='cpu', abstract=False):
  model_config = resolve_for_platform(config.model, platform)
  build = lambda: MODELS[config.model.name].Model(model_config, rngs=nnx.Rngs(params=0))
  return nnx.split(nnx.eval_shape(build) if abstract else build(), nnx.Param)


def _graphdef(config, platform='cpu'):
  return _split(config, platform, abstract=True)[0]


def _tokens(config, batch=8):
  return jax.random.randint(jax.random.key(1), (batch, config.data.seq_len + 1), 0,
                            config.model.vocab_size)


def _loss_fn(graphdef, tokens, dropout_key=None):
  rngs = lambda: None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  return lambda params: language_model.next_token_loss(nnx.merge(graphdef, params), tokens,
                                                       rngs())


@functools.partial(jax.jit, static_argnums=0)
def _jit_loss_and_grads(graphdef, params, tokens, dropout_key):
  return jax.value_and_grad(_loss_fn(graphdef, tokens, dropout_key))(params)


def _loss_and_grads(graphdef, params, tokens, dropout_key=None):
  loss, grads = _jit_loss_and_grads(graphdef, params, tokens, dropout_key)
  return loss, nnx.to_pure_dict(grads)


@functools.cache
def _reference(preset='tiny,llama', scan=False):
  """(params, loss, grads) of the plain float32 model, shared by the tests that compare."""
  graphdef, params = _split(_config(preset, scan_layers=scan))
  return (params, *_loss_and_grads(graphdef, params, _tokens(_config(preset))))


def _stacked(pure):
  """Unscanned parameters (blocks 0..N-1) in the scanned layout (one leading layer axis)."""
  pure = dict(pure)
  blocks = pure['blocks']['layers']
  pure['blocks'] = {'layers': jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *(blocks[i] for i in sorted(blocks)))}
  return pure


def _with_values(params, pure):
  params = jax.tree.map(lambda v: v, params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def _assert_close(actual, expected):
  chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-6)


def test_scanned_blocks_are_stacked_with_a_layers_axis():
  _, params = _split(_config(scan_layers=True), abstract=True)
  kernel = params['blocks']['layers']['mlp']['up']['kernel']
  assert kernel.shape == (2, 32, 96)  # [layers, embed, mlp]
  assert kernel.get_metadata()['logical_axes'] == ('layers', 'embed', 'mlp')
  assert params['blocks']['layers']['attn_norm']['scale'].get_metadata()['logical_axes'] == (
      'layers', 'norm')


def test_scanned_matches_unscanned_loss_and_grads():
  """With dropout on: layer i draws the same mask scanned or not, so each has its own."""
  config = _config(dropout_rate=0.3)
  graphdef, params = _graphdef(config), _reference()[0]
  tokens, key = _tokens(config), jax.random.key(7)
  loss, grads = _loss_and_grads(graphdef, params, tokens, key)
  scanned = _config(scan_layers=True, dropout_rate=0.3)
  scanned_graphdef, scanned_params = _split(scanned, abstract=True)
  scanned_params = _with_values(scanned_params, _stacked(nnx.to_pure_dict(params)))
  scanned_loss, scanned_grads = _loss_and_grads(scanned_graphdef, scanned_params, tokens, key)
  _assert_close(scanned_loss, loss)
  _assert_close(scanned_grads, _stacked(grads))
  assert abs(float(loss) - float(_reference()[1])) > 1e-3  # dropout really was on


@pytest.mark.parametrize('remat, scan', [
    ('full', True), ('dots', True), ('names', True), ('names', False)])
def test_remat_policy_keeps_gradients_and_saves_less(remat, scan):
  """Checked on the accelerator model (platform 'tpu', XLA attention, float32), whose matmuls
  are plain dot_generals that the 'dots' policy can see."""
  params, loss, grads = _reference(scan=scan)
  remat_graphdef = _graphdef(_config(remat=remat, **_accelerator(scan)), 'tpu')
  remat_loss, remat_grads = _loss_and_grads(remat_graphdef, params, _tokens(_config()))
  _assert_close(remat_loss, loss)
  _assert_close(remat_grads, grads)
  assert _saved_bytes(remat, scan) < _saved_bytes('none', scan)
  if remat != 'full':  # keeps more than the blocks' inputs
    assert _saved_bytes(remat, scan) > _saved_bytes('full', scan)


def _accelerator(scan):
  return dict(scan_layers=scan, dtype='float32', attention='xla')


@functools.cache
def _saved_bytes(remat, scan) -> int:
  """Bytes the forward pass keeps for the backward pass (the vjp closure's arrays)."""
  graphdef = _graphdef(_config(remat=remat, **_accelerator(scan)), 'tpu')
  loss_fn = _loss_fn(graphdef, _tokens(_config()))
  vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss_fn, p)[1], _reference(scan=scan)[0])
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))


@pytest.mark.parametrize('preset', ['tiny', 'tiny,llama'], ids=['tied', 'untied'])
def test_chunked_loss_matches_full_logits(preset):
  params, loss, grads = _reference(preset)
  tokens = _tokens(_config(preset))
  chunked_graphdef = _graphdef(_config(preset, loss_chunk=8))
  chunked_loss, chunked_grads = _loss_and_grads(chunked_graphdef, params, tokens)
  _assert_close(chunked_loss, loss)
  _assert_close(chunked_grads, grads)


def test_chunked_loss_never_makes_the_full_logits():
  tokens = _tokens(_config())
  params = _reference()[0]
  jaxprs = {chunk: str(jax.make_jaxpr(jax.grad(_loss_fn(_graphdef(_config(loss_chunk=chunk)),
                                                         tokens)))(params)) for chunk in (0, 8)}
  full_BxLxV, chunk_BxCxV = 'f32[8,32,256]', 'f32[8,8,256]'
  assert full_BxLxV in jaxprs[0]
  assert full_BxLxV not in jaxprs[8] and chunk_BxCxV in jaxprs[8]


def test_loss_chunk_must_divide_the_sequence():
  config = _config(loss_chunk=12)
  with pytest.raises(config_check.ConfigError, match=r'^model\.loss_chunk: 12 does not divide'):
    config_check.check_model(config)


def test_unknown_remat_name_is_a_config_error():
  config = _config(remat='names', remat_names=('attention_out', 'mlp_outt'))
  with pytest.raises(config_check.ConfigError, match=r'^model\.remat_names: unknown mlp_outt'):
    config_check.check_model(config)


@pytest.mark.parametrize('platform, dtype, kernel', [
    ('cpu', 'float32', 'cpu'), ('gpu', 'bfloat16', 'cudnn'), ('tpu', 'bfloat16', 'splash')])
def test_auto_resolves_per_platform(platform, dtype, kernel):
  config = _config()
  assert config.model.dtype == config.model.attention == 'auto'  # the defaults
  resolved = resolve_for_platform(config.model, platform)
  assert (resolved.dtype, resolved.attention, resolved.platform) == (dtype, kernel, platform)
  assert resolved.param_dtype == 'float32' and config.model.dtype == 'auto'  # a copy
  explicit = resolve_for_platform(_config(dtype='float32', attention='xla').model, platform)
  assert (explicit.dtype, explicit.attention) == ('float32', 'xla')


def test_cudnn_is_not_chosen_for_float32_on_gpu():
  assert resolve_for_platform(_config(dtype='float32').model, 'gpu').attention == 'xla'


def test_bfloat16_activations_run_on_cpu():
  """Llama style (untied unembedding); the tied one runs bfloat16 in the TPU compile below."""
  preset = 'tiny,llama'
  params, reference_loss, _ = _reference(preset)
  tokens = _tokens(_config(preset))
  graphdef = _graphdef(_config(preset, dtype='bfloat16', loss_chunk=16))
  model = nnx.merge(graphdef, params)
  hidden = jax.eval_shape(lambda: model.hidden(tokens[:, :-1]))
  assert hidden.dtype == jnp.bfloat16
  assert jax.eval_shape(model.logits, hidden).dtype == jnp.float32  # logits stay float32
  loss, grads = _loss_and_grads(graphdef, params, tokens)
  assert loss.dtype == jnp.float32 and abs(float(loss) - float(reference_loss)) < 0.02
  assert float(loss) != float(reference_loss)  # bfloat16 really was used
  chex.assert_tree_all_finite(grads)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # param_dtype


def test_scanned_sharded_step_matches_single_device_gradients():
  """A scanned, rematerialised, chunked-loss train step over fsdp=4 x tensor=2."""
  config = _config(scan_layers=True, remat='full', loss_chunk=16)
  config.mesh.update(test_sharding.LAYOUTS['fsdp4_tensor2'])
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    kernel = state['params']['blocks']['layers']['mlp']['up']['kernel']  # [layers, embed, mlp]
    assert kernel.addressable_shards[0].data.shape == (2, 8, 48)  # embed/4, mlp/2
    initial_params = jax.device_get(state['params'])
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    _, metrics = train_step(state, language_model.one_document_per_row(_tokens(config)))
  params, loss, grads = _reference(scan=True)  # one device, no remat, full logits
  _assert_close(initial_params, nnx.to_pure_dict(params))
  _assert_close(metrics['train/loss'], loss)
  _assert_close(metrics['train/grad_norm'], optax.tree.norm(grads))


def test_splash_attention_matches_xla_attention_under_the_mesh():
  """The splash wrapper (scaling, layout, grouped heads, shard_map over batch and heads), with
  the kernel run by Pallas' interpreter on the 8 CPU devices."""
  config = _config(preset='tiny,fsdp_tp')
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  keys = jax.random.split(jax.random.key(0), 3)
  q_BxLxHxK = jax.random.normal(keys[0], (4, 128, 4, 32))
  k_BxLxGxK, v_BxLxGxK = (jax.random.normal(key, (4, 128, 2, 32)) for key in keys[1:])
  splash = lambda *qkv: attention.splash_attention(*qkv, interpret=True)
  xla = lambda *qkv: attention.attention('xla', *qkv)
  results = []
  with sharding.activate(mesh, config.mesh.rules):
    for fn in (splash, xla):
      loss_fn = lambda *qkv, fn=fn: jnp.sum(jnp.sin(fn(*qkv)))
      results.append(jax.jit(jax.value_and_grad(loss_fn, (0, 1, 2)))(q_BxLxHxK, k_BxLxGxK,
                                                                      v_BxLxGxK))
  chex.assert_trees_all_close(*results, rtol=2e-5, atol=2e-5)


def _tpu_mesh(config):
  pytest.importorskip('libtpu', reason='compiling for a TPU topology needs libtpu')
  return sharding.make_mesh(config.mesh, tpu_slices.devices('v5e-4'))  # v5e:2x2, 4 chips


def test_splash_attention_compiles_for_tpu():
  config = _config(preset='tiny,fsdp_tp')
  config.mesh.update(data=1, fsdp=2, tensor=2)
  mesh = _tpu_mesh(config)
  batch_heads = NamedSharding(mesh, sharding.logical_spec(config.mesh.rules, 'batch', 'length',
                                                          'heads', 'kv'))
  q = jax.ShapeDtypeStruct((4, 512, 4, 128), jnp.bfloat16, sharding=batch_heads)
  kv = jax.ShapeDtypeStruct((4, 512, 2, 128), jnp.bfloat16, sharding=batch_heads)

  def forward_and_backward(q, k, v):
    out, vjp_fn = jax.vjp(attention.splash_attention, q, k, v)
    return vjp_fn(out)

  with sharding.activate(mesh, config.mesh.rules):
    compiled = jax.jit(forward_and_backward).lower(q, kv, kv).compile()
  assert compiled.as_text().count('tpu_custom_call') == 3  # forward, dq, dkv kernels


def test_scanned_remat_chunked_model_compiles_for_tpu():
  """The whole train step as a pod would run it: dtype and attention 'auto' resolve from the
  mesh's TPU devices to bfloat16 and splash, on this CPU host. GPT-2 style (tied unembedding)
  with grouped-query heads."""
  config = _config('tiny', embed_dim=256, num_heads=4, num_kv_heads=2, mlp_dim=512,
                   vocab_size=512, max_len=256, scan_layers=True, remat='names',
                   loss_chunk=128)
  config.data.seq_len = 256
  config.mesh.update(data=1, fsdp=2, tensor=2)
  mesh = _tpu_mesh(config)
  setup = state_lib.make_setup(config, mesh)
  batch = base.abstract_batch(setup.task.batch_spec('train'), mesh, config.mesh.rules)
  with sharding.activate(mesh, config.mesh.rules):
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    lowered = train_step.lower(setup.abstract_state, batch)
  assert 'tensor<8x256x512xf32>' not in lowered.as_text()  # no whole [B, L, V] logits
  hlo = lowered.compile().as_text()
  assert 'tpu_custom_call' in hlo and 'bf16[' in hlo  # splash, bfloat16 activations
