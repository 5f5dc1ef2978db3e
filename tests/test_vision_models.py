"""The image classifiers (models/cnn.py, resnet.py, vit.py): their forward pass, that any mesh
layout gives the single-device loss and gradients, the ViT's memory levers, BatchNorm's
statistics, config validation, FLOP counts, and that each can learn."""

import functools
import importlib
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
from models import MODELS, cnn
from models.platforms import resolve_for_platform
from parallel import sharding
from tasks import TASKS

NAMES = ('cnn', 'resnet', 'vit')
# Widths divisible by 8 so that fsdp=8 and tensor=2 really split them. A random head: the
# default zero head passes no gradient back at the first step, which would leave the layers
# before it untested.
TINY = {
    'cnn': dict(image_shape=(8, 8, 1), conv_features=(8, 16), dense_dim=16, num_classes=4,
                head_init='lecun_uniform'),
    'resnet': dict(image_shape=(8, 8, 3), stage_sizes=(1, 1), width=8, num_classes=4,
                   head_init='lecun_uniform'),
    'vit': dict(image_shape=(8, 8, 1), patch_size=4, max_len=5, num_layers=2, num_heads=2,
                num_kv_heads=2, embed_dim=16, mlp_dim=32, num_classes=4, head_init='normal'),
}
# Image classification configs and the rest of their name after configs/.
CONFIGS = ('fashion_mnist_cnn', 'fashion_mnist_resnet', 'cifar10_resnet', 'vit')
LAYOUTS = {
    'data8': dict(data=8, fsdp=1, tensor=1),
    'fsdp8': dict(data=1, fsdp=8, tensor=1),
    'fsdp4_tensor2': dict(data=1, fsdp=4, tensor=2),
}


def _config(name, **overrides):
  m = MODELS[name].default_config()
  m.update(TINY[name])
  m.update(overrides)
  return resolve_for_platform(m, 'cpu')


@functools.cache
def _initial_state(name):
  """(params, BatchNorm statistics) of a fresh model: made once (eager init is slow)."""
  model = MODELS[name].Model(_config(name), rngs=nnx.Rngs(params=0))
  return nnx.split(model, nnx.Param, nnx.BatchStat)[1:]


@functools.cache
def _initial(name, **overrides):
  """(graphdef, params, statistics) of a fresh model; the overrides used here (dropout, dtype)
  leave the parameters as they are."""
  m = _config(name, **overrides)
  abstract = nnx.eval_shape(lambda: MODELS[name].Model(m, rngs=nnx.Rngs(params=0)))
  return nnx.split(abstract, nnx.Param, nnx.BatchStat)[0], *_initial_state(name)


def _model(name, **overrides):
  graphdef, *state = _initial(name, **overrides)
  return nnx.merge(graphdef, *jax.tree.map(lambda x: x, state))  # a copy to mutate


@functools.partial(nnx.jit, static_argnames='train')
def _logits(model, images, train=False, rngs=None):
  """`model(images, ...)`, compiled (eager convolutions are slow); BatchNorm updates stick."""
  return model(images, train=train, rngs=rngs)


def _batch(name, n=16, seed=0):
  m = _config(name)
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, *m.image_shape)).astype(np.float32)
  return images, rng.integers(0, m.num_classes, n).astype(np.int32)


def _loss(graphdef, params, stats, images, labels, train, dropout_key):
  """Mean cross-entropy, and the BatchNorm statistics as the forward pass left them."""
  stats = jax.tree.map(lambda x: x, stats)  # Variables of this trace: BatchNorm updates them
  model = nnx.merge(graphdef, params, stats)
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  logits = model(images, train=train, rngs=rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, nnx.state(model, nnx.BatchStat)


def _loss_grads_stats(graphdef, params, stats, images, labels, dropout_key=None):
  """Loss, gradients and updated statistics of one training-mode step, as pure dicts."""
  # A fresh jit each call: a trace made outside a mesh must not serve a call inside one.
  fn = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=(0, 5))
  (loss, stats), grads = fn(graphdef, params, stats, images, labels, True, dropout_key)
  return jax.device_get((loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(stats)))


@functools.cache
def _reference(name):
  return _loss_grads_stats(*_initial(name), *_batch(name))


@pytest.mark.parametrize('name', NAMES)
def test_forward_shapes_dtype_and_dropout(name):
  model = _model(name, dropout_rate=0.5)
  images, _ = _batch(name, n=3)
  logits = _logits(model, images)
  chex.assert_shape(logits, (3, TINY[name]['num_classes']))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  np.testing.assert_array_equal(_logits(model, images), logits)  # no rngs: no dropout
  assert not np.allclose(_logits(model, images, rngs=nnx.Rngs(dropout=1)), logits)


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_activations_give_float32_logits_near_float32_ones(name):
  images, _ = _batch(name, n=3)
  logits = _logits(_model(name, dtype='bfloat16', dropout_rate=0.5), images)
  assert logits.dtype == jnp.float32
  # (The float32 model is the one above, compiled already.)
  np.testing.assert_allclose(logits, _logits(_model(name, dropout_rate=0.5), images), atol=0.1)


@pytest.mark.parametrize('name', NAMES)
def test_state_is_parameters_and_statistics_with_logical_axes(name):
  """No module keeps the Rngs it was built with (dropout gets its key at call time)."""
  build = lambda: MODELS[name].Model(_config(name), rngs=nnx.Rngs(params=0, dropout=1))
  state = nnx.state(nnx.eval_shape(build))
  for path, variable in nnx.to_flat_state(state):
    assert type(variable) in (nnx.Param, nnx.BatchStat), (path, type(variable))
    axes = variable.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == variable.ndim, (path, axes)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('name', NAMES)
def test_sharded_matches_single_device(name, layout):
  """Loss, gradients and (ResNet) updated BatchNorm statistics of one global batch."""
  mesh_config = default.get_config().mesh
  mesh_config.update(LAYOUTS[layout])
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  graphdef, params, stats = _initial(name)
  _, abstract_params, abstract_stats = nnx.split(
      nnx.eval_shape(lambda: nnx.merge(graphdef, params, stats)), nnx.Param, nnx.BatchStat)
  params = jax.device_put(params, sharding.param_shardings(abstract_params, mesh, rules))
  stats = jax.device_put(stats, sharding.param_shardings(abstract_stats, mesh, rules))
  batch = jax.device_put(_batch(name), sharding.logical_sharding(mesh, rules, 'batch'))
  with sharding.activate(mesh, rules):
    run = _loss_grads_stats(graphdef, params, stats, *batch)
  chex.assert_trees_all_close(run, _reference(name), rtol=1e-5, atol=1e-6)
  # The parameters really were split: the largest over all of fsdp x tensor.
  largest = max(jax.tree.leaves(params), key=lambda x: x.size)
  split = mesh.shape['fsdp'] * mesh.shape['tensor']
  assert largest.addressable_shards[0].data.size == largest.size // split


def _stacked(pure):
  """Unscanned ViT parameters (blocks 0..N-1) in the scanned layout (a leading layer axis)."""
  blocks = pure['blocks']['layers']
  layers = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in sorted(blocks)))
  return {**pure, 'blocks': {'layers': layers}}


@functools.cache
def _vit_with_dropout(seed):
  graphdef, params, _ = _initial('vit', dropout_rate=0.2)
  return _loss_grads_stats(graphdef, params, nnx.State({}), *_batch('vit'),
                           jax.random.key(seed))


def test_vit_scanned_and_rematerialised_keeps_loss_and_gradients():
  """Both levers at once (each is tested alone on the decoder, tests/test_memory_levers.py),
  with dropout on, so each layer must draw the same mask scanned or not."""
  loss, grads, _ = _vit_with_dropout(seed=3)
  lever_graphdef, lever_params = nnx.split(
      nnx.eval_shape(lambda: MODELS['vit'].Model(
          _config('vit', dropout_rate=0.2, scan_layers=True, remat='full'),
          rngs=nnx.Rngs(params=0))), nnx.Param)
  nnx.replace_by_pure_dict(lever_params,
                           _stacked(nnx.to_pure_dict(_initial('vit', dropout_rate=0.2)[1])))
  lever_loss, lever_grads, _ = _loss_grads_stats(lever_graphdef, lever_params, nnx.State({}),
                                                 *_batch('vit'), jax.random.key(3))
  chex.assert_trees_all_close((lever_loss, lever_grads), (loss, _stacked(grads)), rtol=1e-5,
                              atol=1e-6)
  assert abs(loss - _reference('vit')[0]) > 1e-4  # dropout really was on


def test_resnet_batchnorm_trains_on_batch_statistics_and_evaluates_on_running_ones():
  model, momentum = _model('resnet'), _config('resnet').bn_momentum
  images, _ = _batch('resnet')
  initial = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  eval_logits = _logits(model, images)
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), initial)
  # Evaluation: each image's logits are its own, whatever else is in the batch.
  np.testing.assert_allclose(_logits(model, images[:2]), eval_logits[:2], rtol=1e-5, atol=1e-6)

  stem_BxHxWxC = model.stem(images)
  train_logits = _logits(model, images, train=True)
  np.testing.assert_allclose(model.stem_norm.mean[...],
                             (1 - momentum) * stem_BxHxWxC.mean(axis=(0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(model.stem_norm.var[...],
                             momentum + (1 - momentum) * stem_BxHxWxC.var(axis=(0, 1, 2)),
                             rtol=1e-5)
  # Training: normalised by the batch, so the rest of the batch changes an image's logits.
  assert not np.allclose(_logits(model, images[:2], train=True), train_logits[:2], atol=1e-3)
  # ...and evaluation now uses the updated running statistics.
  assert not np.allclose(_logits(model, images), eval_logits, atol=1e-3)


def _separable(name, n=32):
  """Each class is a fixed random image plus noise: separable by any of the models."""
  m = _config(name)
  rng = np.random.default_rng(1)
  templates = rng.normal(size=(m.num_classes, *m.image_shape))
  labels = np.arange(n) % m.num_classes
  images = templates[labels] + 0.5 * rng.normal(size=(n, *m.image_shape))
  return images.astype(np.float32), labels.astype(np.int32)


@pytest.mark.parametrize('name', NAMES)
def test_training_reduces_the_loss(name):
  graphdef, params, stats = _initial(name, dropout_rate=0.1)
  images, labels = _separable(name)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, key):
    (loss, stats), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
        graphdef, params, stats, images, labels, True, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for i in range(30):
    params, stats, opt_state, loss = step(params, stats, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize('name, key, value', [
    ('cnn', 'conv_features', (8, 0)),
    ('cnn', 'activation', 'swish'),
    ('cnn', 'image_shape', (2, 2, 1)),  # two 2x2 pools need at least 4x4
    ('resnet', 'stage_sizes', ()),
    ('resnet', 'width', 0),
    ('resnet', 'bn_momentum', 1.0),
    ('vit', 'patch_size', 3),  # does not divide 8
    ('vit', 'pool', 'max'),
    ('vit', 'max_len', 4),  # 4 patches and [CLS] are 5 tokens
    ('vit', 'num_kv_heads', 3),  # the shared layers' check
])
def test_validate_names_the_bad_key(name, key, value):
  m = _config(name)
  config = ml_collections.ConfigDict({'model': m})
  MODELS[name].validate(m, config)  # the tiny config itself is fine
  m[key] = value
  with pytest.raises(ValueError, match=rf'^model\.{key}: '):
    MODELS[name].validate(m, config)


def test_vit_heads_must_split_evenly_over_the_mesh():
  m = _config('vit')  # 2 heads
  MODELS['vit'].validate_sharding(m, lambda name: 2 if name == 'heads' else 8)
  with pytest.raises(ValueError, match=r'^model\.num_heads: 2 heads cannot be split 4 ways'):
    MODELS['vit'].validate_sharding(m, lambda name: 4 if name == 'heads' else 1)


@pytest.mark.parametrize('name', NAMES)
def test_default_config_is_valid_and_counts_flops_like_xla(name):
  """The analytic count is 3x the forward FLOPs that XLA counts in the unoptimised program
  (its convolutions and matmuls; the rest, elementwise work, is a few percent)."""
  m = resolve_for_platform(MODELS[name].default_config(), 'cpu')
  MODELS[name].validate(m, ml_collections.ConfigDict({'model': m}))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MODELS[name].Model(m, rngs=nnx.Rngs(0))))
  forward = lambda state, images: nnx.merge(graphdef, state)(images)
  images = jax.ShapeDtypeStruct((1, *m.image_shape), jnp.float32)
  xla_flops = jax.jit(forward).trace(state, images).lower().cost_analysis()['flops']
  analytic = MODELS[name].train_flops_per_example(m, None)
  # XLA leaves out the products with a 'SAME' convolution's zero padding; we count them.
  assert 0.95 < analytic / (3 * xla_flops) < 1.15


@pytest.mark.parametrize('shape', [(2, 28, 28, 3), (2, 7, 7, 4), (1, 5, 6, 2)])
def test_max_pool_2x2_is_flax_max_pool_in_value_and_gradient(shape):
  """The CNN's reshape-based pool (faster to differentiate on CPU) against nnx.max_pool, odd
  sizes included; random inputs have no ties, where the two gradients could differ."""
  x = jax.random.normal(jax.random.key(0), shape)
  weights = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2,
                                                  shape[3]))
  ours = jax.value_and_grad(lambda x: jnp.sum(cnn.max_pool_2x2(x) * weights))(x)
  flax = jax.value_and_grad(
      lambda x: jnp.sum(nnx.max_pool(x, (2, 2), strides=(2, 2)) * weights))(x)
  jax.tree.map(np.testing.assert_array_equal, ours, flax)


@pytest.mark.parametrize('name', CONFIGS)
def test_first_loss_is_a_uniform_guess(name):
  """The first training step's loss, the task's on a batch of the config's shape, is within 10%
  of ln(num_classes): a fresh model guesses every class equally (its head starts at zero), so
  early steps are not spent shrinking overconfident logits. One init and one forward."""
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  m = resolve_for_platform(config.model, 'cpu')
  task = TASKS[config.task.name].Task(config, MODELS[m.name])
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.normal(size=(8, *m.image_shape)).astype(np.float32),
           'label': rng.integers(0, m.num_classes, 8).astype(np.int32)}

  @jax.jit
  def first_loss(batch):
    model = MODELS[m.name].Model(m, rngs=nnx.Rngs(params=config.seed))
    return task.loss(model, batch, nnx.Rngs(dropout=1))[0]

  chance = math.log(m.num_classes)
  assert abs(first_loss(batch) - chance) <= 0.1 * chance
