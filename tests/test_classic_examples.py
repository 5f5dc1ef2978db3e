"""The classic examples, offline: the MLP (models/mlp.py), the CIFAR-10 binary reader
(data/images.py), and the MNIST and CIFAR-10 configs on generated files: two trained through
train.py as a user runs them, two checked in process up to their first loss."""

import importlib
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from data import classification
from data.pipeline import RecordStats
from models import MODELS
from models.platforms import resolve_for_platform
from parallel import sharding
from tasks import TASKS
from tests.test_tasks import _write_idx
from tests.test_train_e2e import REPO, run_train
from tests.test_vision_models import LAYOUTS, _loss_grads_stats
from training import config_check

CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                 'ship', 'truck')


def _write_cifar_bin(path, images_NxHxWxC, labels_N):
  """Records as the CIFAR-10 binary version has them: a label byte, then the 3072 pixels
  channel-major (all red, all green, all blue), each channel row by row."""
  pixels = images_NxHxWxC.transpose(0, 3, 1, 2).reshape(len(labels_N), -1)
  path.write_bytes(np.concatenate([labels_N[:, None], pixels], axis=1).astype(np.uint8).tobytes())


def _class_images(rng, labels):
  """Noise with a bright band at each label's own rows: learnable in a few steps."""
  images = rng.integers(0, 60, (len(labels), 32, 32, 3))
  for image, label in zip(images, labels):
    image[3 * label: 3 * label + 2] = 250
  return images.astype(np.uint8)


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  """A tiny CIFAR-10 binary set unpacked as the archive unpacks: `cifar-10-batches-bin/` with
  five training files of 16 records (the last of 8), a test file of 24 and batches.meta.txt
  (names, then a blank line). Returned: the folder above it, the default config's layout."""
  root = tmp_path_factory.mktemp('cifar')
  directory = root / 'cifar-10-batches-bin'
  directory.mkdir()
  rng = np.random.default_rng(0)
  for name, n in [(f'data_batch_{i}.bin', 16) for i in range(1, 5)] + [
      ('data_batch_5.bin', 8), ('test_batch.bin', 24)]:
    labels = rng.integers(0, 10, n).astype(np.uint8)
    _write_cifar_bin(directory / name, _class_images(rng, labels), labels)
  (directory / 'batches.meta.txt').write_text('\n'.join(CIFAR_CLASSES) + '\n\n')
  return root


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  """MNIST-shaped IDX files, gzipped as MNIST is downloaded."""
  directory = tmp_path_factory.mktemp('mnist')
  rng = np.random.default_rng(1)
  for prefix, n in (('train', 96), ('t10k', 24)):
    labels = rng.integers(0, 10, n)
    images = _class_images(rng, labels)[..., 0][:, :28, :28]
    for ext, array in (('images-idx3-ubyte', images), ('labels-idx1-ubyte', labels)):
      _write_idx(directory / f'{prefix}-{ext}.gz', array)
  return directory


def _cifar_source(path, split):
  d = classification.default_data_config()
  d.update(dict(source='cifar_bin', path=str(path)))
  return classification.make_source(d, split)


def test_cifar_binary_records_become_hwc_images_with_their_labels(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
  labels = np.array([3, 0, 9, 1, 1, 5, 2], np.uint8)
  for i in range(1, 6):  # the training split is the five files in order
    _write_cifar_bin(tmp_path / f'data_batch_{i}.bin', images[i - 1:i + 1], labels[i - 1:i + 1])
  _write_cifar_bin(tmp_path / 'test_batch.bin', images[5:], labels[5:])
  train, test = _cifar_source(tmp_path, 'train'), _cifar_source(tmp_path, 'test')
  assert (len(train), len(test)) == (10, 2)
  record = train[3]  # data_batch_2.bin's second record: image 2
  np.testing.assert_array_equal(record['inputs'], images[2])
  assert record['inputs'].shape == (32, 32, 3) and record['label'] == 9
  # By the bytes themselves: pixel (row 0, column 1)'s green is byte 1 + 1024 + 1.
  raw = (tmp_path / 'data_batch_2.bin').read_bytes()[3073:]
  assert record['inputs'][0, 1, 1] == raw[1 + 1024 + 1] and raw[0] == 9
  np.testing.assert_array_equal(test[1]['inputs'], images[6])
  np.testing.assert_array_equal(train.labels(), [3, 0, 0, 9, 9, 1, 1, 1, 1, 5])
  assert train.record_name(3) == f'{tmp_path / "data_batch_2.bin"} record 1'
  assert train.class_names == [str(i) for i in range(10)]  # no batches.meta.txt


def test_cifar_class_names_come_from_batches_meta(cifar_dir):
  source = _cifar_source(cifar_dir, 'train')  # the folder above cifar-10-batches-bin/
  validation = _cifar_source(cifar_dir, 'validation')  # carved from the five training files
  assert source.class_names == list(CIFAR_CLASSES) and len(source) + len(validation) == 72
  assert len(validation) and not set(source.indices()) & set(validation.indices())


@pytest.mark.parametrize('damage, message', [
    (lambda d: (d / 'data_batch_3.bin').write_bytes(b'\0' * 3073 * 2 + b'\0' * 5),
     r'data_batch_3\.bin has 6151 bytes, not a whole number of 3073-byte'),
    (lambda d: (d / 'data_batch_5.bin').unlink(), r'no data_batch_5\.bin in '),
])
def test_a_malformed_or_missing_cifar_file_is_one_line_naming_data_path(tmp_path, damage,
                                                                        message):
  images, labels = np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.uint8)
  for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
    _write_cifar_bin(tmp_path / name, images, labels)
  damage(tmp_path)
  with pytest.raises(ValueError, match=r'^data\.path: .*' + message) as error:
    _cifar_source(tmp_path, 'train')
  assert '\n' not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The MLP

MLP_TINY = dict(image_shape=(4, 4, 2), hidden_dims=(16, 8), num_classes=4)


def _mlp(**overrides):
  m = MODELS['mlp'].default_config()
  m.update(MLP_TINY, **overrides)
  return resolve_for_platform(m, 'cpu')


def _mlp_batch(n=16):
  rng = np.random.default_rng(0)
  return (rng.normal(size=(n, *MLP_TINY['image_shape'])).astype(np.float32),
          rng.integers(0, MLP_TINY['num_classes'], n).astype(np.int32))


def test_mlp_logits_dropout_bfloat16_and_a_first_loss_at_chance():
  model = MODELS['mlp'].Model(_mlp(dropout_rate=0.5), rngs=nnx.Rngs(params=0))
  images, _ = _mlp_batch(3)
  logits = nnx.jit(lambda model, x, rngs=None: model(x, rngs=rngs))
  chex.assert_shape(logits(model, images), (3, 4))
  assert logits(model, images).dtype == jnp.float32
  np.testing.assert_array_equal(logits(model, images), 0.0)  # the zero head: ln(4) for all
  random_head = MODELS['mlp'].Model(_mlp(dropout_rate=0.5, head_init='lecun_uniform'),
                                    rngs=nnx.Rngs(params=0))
  evaluated = logits(random_head, images)
  np.testing.assert_array_equal(logits(random_head, images), evaluated)  # no rngs: no dropout
  assert not np.allclose(logits(random_head, images, nnx.Rngs(dropout=1)), evaluated)
  bfloat16 = logits(MODELS['mlp'].Model(_mlp(head_init='lecun_uniform', dtype='bfloat16'),
                                        rngs=nnx.Rngs(params=0)), images)
  assert bfloat16.dtype == jnp.float32
  np.testing.assert_allclose(bfloat16, evaluated, atol=0.1)
  state = nnx.state(random_head, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    axes = variable.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == variable.ndim, (path, axes)
  assert [state['hidden'][i]['kernel'].shape for i in (0, 1)] == [(32, 16), (16, 8)]
  assert state['head']['kernel'].shape == (8, 4)
  assert MODELS['mlp'].train_flops_per_example(_mlp(), None) == 6 * (32 * 16 + 16 * 8 + 8 * 4)


@pytest.mark.parametrize('key, value', [('hidden_dims', (8, 0)), ('head_init', 'ones'),
                                        ('activation', 'swish')])
def test_mlp_validate_names_the_bad_key(key, value):
  m = _mlp()
  MODELS['mlp'].validate(m, ml_collections.ConfigDict({'model': m}))
  m[key] = value
  with pytest.raises(ValueError, match=rf'^model\.{key}: '):
    MODELS['mlp'].validate(m, ml_collections.ConfigDict({'model': m}))


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_mlp_sharded_matches_single_device(layout):
  """Loss and gradients of one global batch; a random head, so every layer has a gradient."""
  m = _mlp(head_init='lecun_uniform')
  graphdef, params = nnx.split(MODELS['mlp'].Model(m, rngs=nnx.Rngs(params=0)), nnx.Param)
  stats = nnx.State({})
  reference = _loss_grads_stats(graphdef, params, stats, *_mlp_batch())
  mesh_config = default.get_config().mesh
  mesh_config.update(LAYOUTS[layout])
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
  batch = jax.device_put(_mlp_batch(), sharding.logical_sharding(mesh, rules, 'batch'))
  with sharding.activate(mesh, rules):
    run = _loss_grads_stats(graphdef, params, stats, *batch)
  chex.assert_trees_all_close(run, reference, rtol=1e-5, atol=1e-6)
  largest = params['hidden'][0]['kernel'][...]  # really split over all of fsdp x tensor
  assert largest.addressable_shards[0].data.size == largest.size // (
      mesh.shape['fsdp'] * mesh.shape['tensor'])
  assert min(np.abs(g).max() for g in jax.tree.leaves(reference[1])) > 0


# ---------------------------------------------------------------------------------------------
# The configs

@pytest.mark.parametrize('name, data', [('mnist_mlp', 'mnist_dir'), ('cifar10_cnn', 'cifar_dir')])
def test_classic_config_trains_through_train_py(name, data, request, tmp_path):
  """The tiny preset as a user runs it, with only data.path set."""
  config = '--config=' + os.path.join(REPO, 'configs', f'{name}.py') + ':tiny'
  data_path = request.getfixturevalue(data)
  result = run_train(tmp_path / 'run', config, f'--config.data.path={data_path}')
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'run' / 'summary.json') as f:
    summary = json.load(f)
  assert summary['complete'] and summary['step'] == 8
  assert math.isfinite(summary['last']['eval/loss'])  # validation, every eval
  assert summary['test']['step'] == 8 and 0 <= summary['test']['test/accuracy'] <= 1  # once


@pytest.mark.parametrize('name, data', [('mnist_cnn', 'mnist_dir'),
                                        ('cifar10_resnet', 'cifar_dir')])
def test_classic_config_validates_reads_its_data_and_takes_a_loss(name, data, request):
  """What train.py does before its loop, in process (the loop itself is the one the configs
  above run): the config passes the checks, the task reads both splits of the generated files,
  and the model takes a finite loss on the first training batch."""
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  config.data.path = str(request.getfixturevalue(data))
  config_check.validate(config, num_devices=8, num_processes=1, platform='cpu')
  m = resolve_for_platform(config.model, 'cpu')
  task = TASKS[config.task.name].Task(config, MODELS[m.name])
  batch = next(iter(task.train_batches(RecordStats())))
  chex.assert_shape(batch['inputs'], (config.data.global_batch_size, *m.image_shape))
  assert len(task.test_batches()) == 2  # 24 test images in batches of 16
  assert len(task.eval_batches()) == 1  # about a tenth of the 96 training images

  @jax.jit
  def first_loss(batch):
    model = MODELS[m.name].Model(m, rngs=nnx.Rngs(params=config.seed))
    return task.loss(model, batch, nnx.Rngs(dropout=1))[0]

  assert math.isfinite(first_loss(batch))
