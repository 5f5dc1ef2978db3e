"""Initializers, activations and stochastic depth chosen by config (models/initializers.py,
`model.init`, `model.activation`, `model.stochastic_depth`): each initializer's variance
against its fan formula, the defaults' initial parameters unchanged, every activation training,
stochastic depth's statistics, evaluation and sharding, and the config errors."""

import functools
import hashlib
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from models import MODELS, checks, initializers, layers, resnet
from models.platforms import resolve_for_platform
from parallel import sharding

TINY = {
    'cnn': dict(image_shape=(8, 8, 1), conv_features=(8,), dense_dim=16, num_classes=4),
    'resnet': dict(image_shape=(8, 8, 3), stage_sizes=(1,), width=8, num_classes=4),
    'vit': dict(image_shape=(8, 8, 1), patch_size=4, max_len=5, num_layers=1, num_heads=2,
                num_kv_heads=2, embed_dim=16, mlp_dim=32, num_classes=4),
    'transformer': dict(num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, mlp_dim=32,
                        max_len=8, tie_embeddings=False),
    'encoder': dict(num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, mlp_dim=32,
                    max_len=8, head='classify'),
}
# sha256 (first 16 hex digits) of each TINY model's initial parameters (nnx.Rngs(params=0),
# built under jit), computed with main's code (commit 0913e9d, before initializers became
# configurable: explicit he_uniform / lecun_uniform / normal(0.02) initializers).
MAIN_DIGESTS = {'cnn': '86252135c0cbaa41', 'resnet': '5c10770ed0bfc482',
                'vit': '251e0db2d51a7cb4', 'transformer': '0a30c221d131e550',
                'encoder': 'a7fc00f6580bc6ea'}
# The classifier heads of that code; they start at zero now (tests/test_vision_models.py
# checks the first loss), everything else as it was.
MAIN_HEADS = {'cnn': 'lecun_uniform', 'resnet': 'lecun_uniform', 'vit': 'normal',
              'encoder': 'normal'}


def _config(name, **overrides):
  m = MODELS[name].default_config()
  m.update(TINY[name])
  m.update(overrides)
  return resolve_for_platform(m, 'cpu')


def _random(build, seed=0):
  """(graphdef, parameters, other state) of `build()` with random values in place of its
  initial ones: no initializer to compile, for the tests that need any reasonable values."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rng = np.random.default_rng(seed)
  def draw(x):  # vectors (biases, norm scales, BatchNorm statistics) near 1
    value = (1 + 0.1 * rng.normal(size=x.shape) if x.ndim == 1 else
             rng.normal(size=x.shape) / math.sqrt(math.prod(x.shape[:-1])))
    return value.astype(x.dtype)
  return graphdef, jax.tree.map(draw, params), jax.tree.map(draw, rest)


def _model(name, seed=0, **overrides):
  return _random(lambda: MODELS[name].Model(_config(name, **overrides), rngs=nnx.Rngs(0)), seed)


@pytest.mark.parametrize('name', sorted(TINY))
def test_default_initial_parameters_are_those_of_main(name):
  """The defaults draw what main drew, but for the zero classifier heads."""
  m = _config(name, **({'head_init': MAIN_HEADS[name]} if name in MAIN_HEADS else {}))
  # Under jit, as the trainer builds them (eager init is slower still).
  params = jax.jit(lambda: nnx.state(MODELS[name].Model(m, rngs=nnx.Rngs(params=0)), nnx.Param))()
  digest = hashlib.sha256()
  for path, leaf in sorted(nnx.to_flat_state(params), key=lambda kv: str(kv[0])):
    digest.update(str(path).encode())
    digest.update(np.asarray(leaf[...]).tobytes())
  assert digest.hexdigest()[:16] == MAIN_DIGESTS[name]


def _truncated_variance():
  """Variance of a standard normal truncated to [-2, 2]."""
  density = math.exp(-2) / math.sqrt(2 * math.pi)
  return 1 - 4 * density / math.erf(2 / math.sqrt(2))


def _expected_variance(name, fan_in, fan_out, std):
  if name == 'normal':
    return std**2
  if name == 'truncated_normal':
    return std**2 * _truncated_variance()
  numerator = {'xavier': 2 / (fan_in + fan_out), 'he': 2 / fan_in, 'lecun': 1 / fan_in}
  return numerator[name.split('_')[0]]


def _check_draw(name, x, fan_in, fan_out, std, scale=1.0):
  """`x` [rows, columns] against the distribution `name` promises."""
  if name == 'orthogonal':  # orthonormal columns, or rows where there are more columns
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    np.testing.assert_allclose(gram, scale**2 * np.eye(len(gram)), atol=1e-5)
    return
  variance = scale**2 * _expected_variance(name, fan_in, fan_out, std)
  assert abs(x.mean()) < 4 * math.sqrt(variance / x.size)
  np.testing.assert_allclose(x.var(), variance, rtol=0.03)
  largest = np.abs(x).max() / math.sqrt(variance)
  if name.endswith('uniform'):  # uniform on +-sqrt(3 variance)
    assert 0.99 * math.sqrt(3) < largest <= math.sqrt(3) * (1 + 1e-6)
  elif name == 'truncated_normal':
    assert largest <= 2 / math.sqrt(_truncated_variance()) * (1 + 1e-6)
  else:  # a normal: beyond 3.5 standard deviations in 120k draws
    assert largest > 3.5


@pytest.mark.parametrize('name', checks.INITS)
def test_dense_kernel_matches_its_fan_formula(name):
  fan_in, fan_out, std, scale = 256, 512, 0.05, 0.5  # `scale`: the depth-scaled projections
  x = np.asarray(initializers.kernel(name, std, scale)(jax.random.key(0), (fan_in, fan_out)))
  _check_draw(name, x, fan_in, fan_out, std, scale)


@pytest.mark.parametrize('name', checks.INITS)
def test_conv_kernel_drawn_as_a_matrix_keeps_the_kernels_fans(name):
  """Fans of a [3, 3, in, out] kernel: 9 in and 9 out (the receptive field times channels)."""
  shape = (3, 3, 64, 128)
  x = initializers.conv_kernel(name, 0.05)(jax.random.key(0), shape)
  assert x.shape == shape
  _check_draw(name, np.asarray(x).reshape(9 * 64, 128), 9 * 64, 9 * 128, 0.05)


def test_depth_scaled_output_projections():
  """GPT-2's rule: the residual-output projection draws (2 num_layers)^-1/2 times the std of the
  rest, the same draws otherwise; the default scale of the whole model is in its digest."""
  def mlp(depth_scaled):
    m = _config('transformer', num_layers=8, init_depth_scaled=depth_scaled)
    return layers.Mlp(m, rngs=nnx.Rngs(params=0))  # small enough to build eagerly
  scaled, plain = mlp(True), mlp(False)
  np.testing.assert_allclose(scaled.down.kernel[...], plain.down.kernel[...] / 4, rtol=1e-6)
  np.testing.assert_array_equal(scaled.up.kernel[...], plain.up.kernel[...])
  np.testing.assert_allclose(np.std(plain.down.kernel[...]), 0.02, rtol=0.15)  # 512 draws


def test_plain_mlp_default_is_tanh_gelu_and_takes_the_activation():
  x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
  gelu = lambda h: 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
  for activation, reference in (('gelu', gelu), ('relu', lambda h: np.maximum(h, 0))):
    graphdef, params, _ = _random(lambda: layers.Mlp(  # pylint: disable=cell-var-from-loop
        _config('transformer', activation=activation), rngs=nnx.Rngs(0)))
    out = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))(params, x)
    p = nnx.to_pure_dict(params)
    hidden = reference(x @ p['up']['kernel'] + p['up']['bias'])
    expected = hidden @ p['down']['kernel'] + p['down']['bias']
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _inputs(name, n=8, seed=0):
  rng = np.random.default_rng(seed)
  m = _config(name)
  if name in ('transformer', 'encoder'):
    return rng.integers(1, 256, (n, m.max_len)).astype(np.int32)
  return rng.normal(size=(n, *m.image_shape)).astype(np.float32)


def _loss(graphdef, params, stats, inputs, key):
  """Mean cross-entropy against label 0 / the input tokens (any target trains), training mode."""
  model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, stats))  # BatchNorm sets them
  rngs = None if key is None else nnx.Rngs(dropout=key)
  if isinstance(model, MODELS['transformer'].Model):
    logits = model(inputs, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, inputs).mean()
  logits = model(inputs, train=True, rngs=rngs)
  labels = jnp.zeros(len(inputs), jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize('name', ('cnn', 'resnet', 'transformer'))
def test_every_activation_trains_a_step(name):
  """One program for all the activations (one compile), each model given the same values."""
  inputs = _inputs(name)
  models = [_model(name, activation=activation) for activation in checks.ACTIVATIONS]
  _, params, stats = models[0]

  @jax.jit
  def losses_and_grads(params_per_model):
    return [jax.value_and_grad(functools.partial(_loss, graphdef))(params, stats, inputs, None)
            for (graphdef, _, _), params in zip(models, params_per_model)]

  before = losses_and_grads([params] * len(models))
  stepped = [jax.tree.map(lambda p, g: p - 0.01 * g, params, grads) for _, grads in before]
  after = losses_and_grads(stepped)  # one SGD step each
  for activation, (loss, _), (stepped_loss, _) in zip(checks.ACTIVATIONS, before, after):
    assert np.isfinite(loss) and stepped_loss < loss, (activation, loss, stepped_loss)
  # Each activation computes something else: the key is read.
  assert len({float(loss) for loss, _ in before}) == len(checks.ACTIVATIONS), before


def test_drop_path_drops_whole_examples_at_the_rate_and_rescales_the_rest():
  rate, n = 0.3, 20000
  y = jnp.ones((n, 3, 2))
  out = np.asarray(layers.drop_path(y, rate, jax.random.key(0)))
  dropped = np.all(out == 0, axis=(1, 2))
  np.testing.assert_allclose(out[~dropped], 1 / (1 - rate), rtol=1e-6)  # whole examples, rescaled
  assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_array_equal(layers.drop_path(y, rate, None), y)  # no key: evaluation


def test_depth_rates_rise_linearly_to_the_last_blocks():
  np.testing.assert_allclose(layers.depth_rates(0.3, 4), [0, 0.1, 0.2, 0.3], rtol=1e-6)
  np.testing.assert_allclose(layers.depth_rates(0.3, 1), [0.3])


def test_transformer_block_drops_each_branch_of_each_example_independently():
  """Both branches dropped (the block is the identity): rate^2 of the examples."""
  rate, n = 0.5, 4000
  graphdef, params, _ = _random(lambda: layers.Block(_config('vit'), rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(n, 2, 16)), jnp.float32)
  block = jax.jit(lambda params, x, depth: nnx.merge(graphdef, params)(x, depth=depth))
  out = block(params, x, (jax.random.key(1), rate))
  identity = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2))
  assert abs(identity.mean() - rate**2) < 4 * math.sqrt(rate**2 * (1 - rate**2) / n)
  np.testing.assert_array_equal(block(params, x, (jax.random.key(1), 0.0)), block(params, x, None))


def test_resnet_block_drops_its_branch_at_the_rate():
  rate, n = 0.25, 2000
  state = _random(lambda: resnet.Block(8, 8, 1, _config('resnet'), rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(n, 4, 4, 8)), jnp.float32)
  graphdef, params, stats = state
  out = jax.jit(lambda params, stats, x, key: nnx.merge(graphdef, params, stats)(
      x, True, rate, key))(params, stats, x, jax.random.key(2))
  shortcut_only = np.all(np.asarray(out) == np.maximum(np.asarray(x), 0), axis=(1, 2, 3))
  assert abs(shortcut_only.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize('name', ('resnet', 'vit'))
def test_stochastic_depth_is_off_in_evaluation_and_on_in_training(name):
  """Evaluation (no rngs) gives rate 0's logits; training drops branches, per key."""
  graphdef, params, stats = _model(name, stochastic_depth=0.5)
  base_graphdef = _model(name)[0]
  inputs = _inputs(name)

  @jax.jit
  def logits(params, stats):
    def run(graphdef, key=None):
      rngs = None if key is None else nnx.Rngs(dropout=key)
      return nnx.merge(graphdef, params, stats)(inputs, train=key is not None, rngs=rngs)
    return (run(graphdef), run(base_graphdef), run(graphdef, jax.random.key(0)),
            run(graphdef, jax.random.key(1)), run(base_graphdef, jax.random.key(0)))

  evaluated, evaluated_rate0, trained, trained_other_key, trained_rate0 = logits(params, stats)
  np.testing.assert_array_equal(evaluated, evaluated_rate0)
  assert not np.allclose(trained, trained_rate0)  # on in training...
  assert not np.allclose(trained, trained_other_key)  # ...drawn per key


def _stacked(pure):
  """Unscanned ViT parameters (blocks 0..N-1) in the scanned layout (a leading layer axis)."""
  blocks = pure['blocks']['layers']
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *(blocks[i] for i in sorted(blocks)))
  return {**pure, 'blocks': {'layers': stacked}}


def test_sharded_stochastic_depth_matches_single_device():
  """data=2 x fsdp=4: each example's branches are dropped as on one device. The ViT (two
  layers, rates 0 and 0.5) is scanned on the mesh, so scanned layers draw as unscanned ones.
  (The ResNet draws through the same `layers.drop_path`.)"""
  name, overrides = 'vit', dict(stochastic_depth=0.5, num_layers=2)
  graphdef, params, stats = _model(name, **overrides)
  inputs, key = _inputs(name, n=16), jax.random.key(3)
  # A fresh jit for the mesh: a trace made outside a mesh must not serve a call inside one.
  loss_and_grads = lambda graphdef: jax.jit(
      functools.partial(jax.value_and_grad(_loss, argnums=1), graphdef))
  single_device = loss_and_grads(graphdef)
  loss, grads = single_device(params, stats, inputs, key)
  other_key_loss = single_device(params, stats, inputs, jax.random.key(4))[0]
  assert abs(loss - other_key_loss) > 1e-4  # stochastic depth is on
  expected = jax.device_get((loss, nnx.to_pure_dict(grads)))
  graphdef, params, _ = _model(name, scan_layers=True, **overrides)
  nnx.replace_by_pure_dict(params, _stacked(nnx.to_pure_dict(_model(name, **overrides)[1])))
  expected = expected[0], _stacked(expected[1])
  mesh_config = default.get_config().mesh
  mesh_config.update(data=2, fsdp=4, tensor=1)
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
  inputs = jax.device_put(inputs, sharding.logical_sharding(mesh, rules, 'batch'))
  with sharding.activate(mesh, rules):
    loss, grads = loss_and_grads(graphdef)(params, stats, inputs, key)
  chex.assert_trees_all_close(jax.device_get((loss, nnx.to_pure_dict(grads))), expected,
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, key, value, message', [
    ('cnn', 'init', 'glorot', "'glorot' is not one of normal, truncated_normal"),
    ('cnn', 'init', 'zeros', "'zeros' is not one of"),  # for heads only
    ('resnet', 'head_init', 'ones', "'ones' is not one of zeros, normal"),
    ('vit', 'head_init', 'he', "'he' is not one of"),
    ('encoder', 'head_init', 'glorot', "'glorot' is not one of"),
    ('resnet', 'init', 'kaiming', "'kaiming' is not one of"),
    ('vit', 'init', 'xavier', "'xavier' is not one of"),
    ('transformer', 'init_std', -0.02, 'must be positive, got -0.02'),
    ('cnn', 'init_std', 0.0, 'must be positive'),
    ('cnn', 'activation', 'swish', "'swish' is not one of relu, leaky_relu"),
    ('resnet', 'activation', 'elu', "'elu' is not one of"),
    ('encoder', 'activation', 'softplus', "'softplus' is not one of"),
    ('vit', 'stochastic_depth', 1.0, r'must be in \[0, 1\), got 1.0'),
    ('resnet', 'stochastic_depth', -0.1, r'must be in \[0, 1\), got -0.1'),
])
def test_config_errors_name_the_key(name, key, value, message):
  m = _config(name)
  config = ml_collections.ConfigDict({'model': m, 'data': {'seq_len': 8}})
  MODELS[name].validate(m, config)  # the tiny config itself is fine
  m[key] = value
  with pytest.raises(ValueError, match=rf'^model\.{key}: {message}'):
    MODELS[name].validate(m, config)


def test_swiglu_takes_no_activation():
  m = _config('transformer', mlp='swiglu', activation='relu')
  with pytest.raises(ValueError, match=r'^model\.activation: .*needs model\.mlp=gelu'):
    MODELS['transformer'].validate(m, ml_collections.ConfigDict({'data': {'seq_len': 8}}))
