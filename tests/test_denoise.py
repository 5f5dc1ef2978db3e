"""Denoising Fashion-MNIST-shaped images with the convolutional autoencoder: the registered
names, the model's shapes and FLOPs, noise fixed by key and row, one-line config errors, and a
train.py run that learns and resumes bit for bit."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import fashion_mnist_denoise
from models import MODELS, autoencoder
from models.platforms import resolve_for_platform
from tasks import TASKS, denoise
from tests.test_faults import _assert_same_state, _losses
from tests.test_tasks import _write_idx
from tests.test_train_e2e import REPO, run_train, saved_state
from training import config_check, metrics

CONFIG = '--config=' + os.path.join(REPO, 'configs', 'fashion_mnist_denoise.py') + ':tiny'


def test_the_model_and_the_task_are_registered():
  assert MODELS['autoencoder'] is autoencoder and TASKS['denoise'] is denoise
  config = fashion_mnist_denoise.get_config('tiny')
  assert (config.model.name, config.task.name) == ('autoencoder', 'denoise')


def test_the_autoencoder_gives_back_the_input_shape_and_counts_its_flops():
  m = autoencoder.default_config()
  m.image_shape, m.features, m.latent_features = (8, 8, 3), (4, 6), 2
  build_and_call = lambda x: autoencoder.Model(resolve_for_platform(m, 'cpu'),
                                                rngs=nnx.Rngs(params=0))(x)
  out = jax.eval_shape(build_and_call, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
  chex.assert_shape(out, (2, 8, 8, 3))
  assert out.dtype == jnp.float32
  # 8x8x3 -> 4x4x4 -> 2x2x6 -> 2x2x2 (the bottleneck) -> 4x4x6 -> 8x8x4 -> 8x8x3: 3x3 kernels
  # down, 1x1 ones to 4x the channels at the smaller size up.
  macs = (9 * (16 * 3 * 4 + 4 * 4 * 6 + 4 * 6 * 2) + 4 * 2 * 24 + 16 * 6 * 16 +
          9 * 64 * 4 * 3)
  assert autoencoder.train_flops_per_example(m, None) == 6 * macs


def test_noise_is_fixed_by_key_and_row_whatever_batch_it_sits_in():
  images = jnp.zeros((6, 4, 4, 1))
  key = jax.random.key(0)
  noise = jax.jit(denoise.noise, static_argnums=3)  # as the steps call it; eager is slower
  whole = noise(images, key, jnp.arange(6), 0.5)
  np.testing.assert_array_equal(noise(images[:2], key, jnp.array([4, 1]), 0.5),
                                whole[jnp.array([4, 1])])
  assert not np.allclose(whole, noise(images, jax.random.key(1), jnp.arange(6), 0.5))
  assert 0.4 < float(jnp.std(whole)) < 0.6


@pytest.mark.parametrize('key, value, message', [
    ('task.noise_std', 0.0, 'task.noise_std: must be positive'),
    ('data.normalize', 'dataset', "data.normalize: 'dataset'; denoising measures noise"),
    ('data.augment', 'flip,mixup', 'data.augment: '),
    ('model.features', (8, 8, 8), 'model.image_shape: (28, 28) is not divisible by 8'),
    ('data.source', 'jsonl', "data.source: 'jsonl' gives texts, and model.name='autoencoder'"),
])
def test_a_bad_key_is_a_one_line_error(key, value, message):
  config = fashion_mnist_denoise.get_config('tiny')
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate(config, num_devices=8, num_processes=1)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Fashion-MNIST-shaped IDX files: a bright square somewhere on a dim ground, 160 training
  and 40 test images (not a multiple of the batch of 16: the last eval batch is padded)."""
  directory = tmp_path_factory.mktemp('squares')
  rng = np.random.default_rng(0)
  for prefix, n in (('train', 160), ('t10k', 40)):
    images = rng.integers(0, 40, (n, 28, 28))
    for image, (row, column) in zip(images, rng.integers(0, 20, (n, 2))):
      image[row:row + 8, column:column + 8] = 230
    _write_idx(directory / f'{prefix}-images-idx3-ubyte.gz', images)
    _write_idx(directory / f'{prefix}-labels-idx1-ubyte.gz', rng.integers(0, 10, n))
  # One compile cache for the three runs: the later two compile nothing.
  return [CONFIG, f'--config.data.path={directory}', f'--compile_cache={directory / "cache"}']


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory, data):  # pylint: disable=redefined-outer-name
  workdir = tmp_path_factory.mktemp('denoise_unbroken')
  result = run_train(workdir, *data)
  assert result.returncode == 0, result.stderr
  return workdir


def test_training_denoises_and_reports_validation_and_test(unbroken):
  losses = [loss for _, loss in _losses(unbroken)]
  assert losses[-1] < 0.5 * losses[0]
  evals = [r for r in metrics.read_metrics(unbroken) if 'eval/psnr' in r]
  assert [r['step'] for r in evals] == [4, 8]
  # The same noisy images at each evaluation; the model's output improves.
  assert evals[0]['eval/noisy_psnr'] == evals[1]['eval/noisy_psnr']
  assert evals[0]['eval/psnr'] < evals[1]['eval/psnr']
  assert evals[1]['eval/mse'] < evals[0]['eval/mse']
  summary = json.loads((unbroken / 'summary.json').read_text())
  assert summary['best']['eval/psnr'] == {'value': evals[1]['eval/psnr'], 'step': 8}  # larger
  assert set(summary['test']) >= {'test/mse', 'test/psnr', 'test/noisy_psnr'}


def test_a_resumed_run_adds_the_same_noise_bit_for_bit(unbroken, data, tmp_path):  # pylint: disable=redefined-outer-name
  assert run_train(tmp_path, *data, '--config.train.stop_after=5').returncode == 0
  resumed = run_train(tmp_path, *data)
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resumed from the checkpoint at step 5' in resumed.stdout
  assert _losses(tmp_path) == _losses(unbroken)
  _assert_same_state(saved_state(tmp_path, 8), saved_state(unbroken, 8))
