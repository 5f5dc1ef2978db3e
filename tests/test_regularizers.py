"""Coupled L1 and L2 penalties and label smoothing, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import fashion_mnist_cnn
from models import MODELS
from parallel import sharding
from tasks import classification, language_model
from training import config_check
from training import optimizer
from training import state as state_lib
from training import step as step_lib


def _loss_and_grads(config, params=None):
  """The step's (loss, aux), grads and the params, for the tiny LM on one fixed batch."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(config, mesh)
  with sharding.activate(mesh, config.mesh.rules):
    params = params or state_lib.init_state(config, setup)['params']
    tokens = np.random.default_rng(0).integers(
        0, 256, (config.data.global_batch_size, config.data.seq_len + 1), dtype=np.int32)
    (loss, (aux, _)), grads = jax.jit(
        lambda p: step_lib._loss_and_grads(  # pylint: disable=protected-access
            setup, p, None, language_model.one_document_per_row(tokens), jax.random.key(0), config,
            None))(params)
  return loss, aux, jax.device_get(grads), jax.device_get(params)


@pytest.mark.parametrize('kind', ['l2', 'l1'])
def test_a_penalty_adds_its_gradient_to_the_kernels_only(kind):
  weight = 0.3
  base_loss, base_aux, base_grads, params = _loss_and_grads(default.get_config('tiny'))
  config = default.get_config('tiny')
  config.optim[f'{kind}_penalty'] = weight
  loss, aux, grads, _ = _loss_and_grads(config, params)
  kernels = optimizer.decay_mask(params)
  leaves = lambda tree: jax.tree.leaves(tree)
  expected_penalty = 0.0
  for w, g0, g, is_kernel in zip(leaves(params), leaves(base_grads), leaves(grads),
                                 leaves(kernels)):
    w = np.asarray(w, np.float64)
    extra = (weight * w if kind == 'l2' else weight * np.sign(w)) if is_kernel else 0.0
    np.testing.assert_allclose(g, g0 + extra, rtol=1e-4, atol=1e-6)
    if is_kernel:
      expected_penalty += (weight / 2 * np.sum(w**2) if kind == 'l2'
                           else weight * np.sum(np.abs(w)))
  assert any(leaves(kernels)) and not all(leaves(kernels))  # both kinds of leaf were checked
  assert float(loss) == float(base_loss)  # the logged loss is the data's alone
  np.testing.assert_allclose(float(aux[f'{kind}_penalty']), expected_penalty, rtol=1e-5)
  assert f'{kind}_penalty' not in base_aux


def test_label_smoothing_matches_the_hand_computed_cross_entropy():
  config = fashion_mnist_cnn.get_config()
  config.task.label_smoothing = 0.2
  task = classification.Task(config, MODELS['cnn'])
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  loss, _ = task.loss(lambda inputs, train, rngs: logits, {'inputs': None, 'label': labels},
                      None)
  log_p = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  targets = np.full((2, 3), 0.2 / 3) + 0.8 * np.eye(3)[labels]
  np.testing.assert_allclose(float(loss), -(targets * log_p).sum(-1).mean(), rtol=1e-6)


@pytest.mark.parametrize('key, value, message', [
    ('optim.l2_penalty', -0.1, 'optim.l2_penalty: must be >= 0'),
    ('optim.l1_penalty', -1.0, 'optim.l1_penalty: must be >= 0'),
    ('task.label_smoothing', 1.0, 'task.label_smoothing: must be in [0, 1)'),
    ('train.loss_scale', 'static', "train.loss_scale: 'static' is not one of"),
    ('train.loss_scale_init', 0.5, 'train.loss_scale_init: must be >= 1'),
])
def test_bad_values_are_one_line_errors_naming_the_key(key, value, message):
  config = fashion_mnist_cnn.get_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_check.ConfigError, match=None) as error:
    config_check.validate(config, num_devices=1, num_processes=1)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)
