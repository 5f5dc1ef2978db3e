"""Image augmentation (data/augment.py), mixed-label loss and class balance (data.balance).

Sources are small in-memory fakes; images carry their record index in two pixels
(tests/test_classification_data.py's `_index_of` reads it back from unaugmented batches).
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fashion_mnist_cnn
from data import augment, classification
from tasks import classification as task_lib
from training import config_check

ALL = 'flip,crop,jitter,mixup,cutmix'


class _Images:
  """`labels[i]` is record i's label; its image is RGB noise seeded by i."""
  kind, class_names = 'image', ['a', 'b', 'c']
  num_classes = 3

  def __init__(self, labels, size=(8, 6)):
    self._labels, self._size = np.asarray(labels), size

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    image = np.random.default_rng(index).integers(0, 256, (*self._size, 3), dtype=np.uint8)
    return {'inputs': image, 'label': int(self._labels[index])}

  def record_name(self, index):
    return f'image {index}'


def _config(**overrides):
  d = classification.default_data_config()
  d.update(dict(normalize='none', global_batch_size=8, worker_threads=1, prefetch_batches=2))
  d.update(overrides)
  return d


def _batches(source, n, process_index=0, process_count=1, **overrides):
  d = _config(**overrides)
  iterator = iter(classification.train_batches(source, d, process_index=process_index,
                                               process_count=process_count))
  return [next(iterator) for _ in range(n)]


def _joined(batches, key='inputs'):
  return np.concatenate([b[key] for b in batches])


# ---------------------------------------------------------------------------------------------
# Determinism

def test_augmentation_is_fixed_by_the_seed_and_changes_with_it():
  source = _Images(np.arange(40) % 3)
  first = _joined(_batches(source, 3, augment=ALL, shuffle_seed=1))
  np.testing.assert_array_equal(first, _joined(_batches(source, 3, augment=ALL, shuffle_seed=1)))
  assert not np.array_equal(first, _joined(_batches(source, 3, augment=ALL, shuffle_seed=2)))


def test_an_examples_augmentation_does_not_depend_on_its_batch():
  """The same sequence of examples cut into batches of 8 or of 4 (another batch composition),
  and read by one process or four, is augmented identically."""
  source = _Images(np.arange(40) % 3)
  big = _batches(source, 6, augment=ALL)
  small = _batches(source, 12, augment=ALL, global_batch_size=4)
  quarters = [_batches(source, 6, p, 4, augment=ALL) for p in range(4)]
  for key in ('inputs', 'label', 'label_b', 'mix'):
    np.testing.assert_array_equal(_joined(big, key), _joined(small, key))
    by_process = np.concatenate([np.concatenate([q[s][key] for q in quarters])
                                 for s in range(6)])
    np.testing.assert_array_equal(_joined(big, key), by_process)


def test_eval_batches_are_never_augmented():
  source = _Images(np.arange(10) % 3)
  [batch] = classification.eval_batches(source, _config(augment=ALL, global_batch_size=10),
                                        process_index=0, process_count=1)
  np.testing.assert_allclose(batch['inputs'] * 255, np.stack([source[i]['inputs']
                                                             for i in range(10)]), atol=1e-4)
  assert batch.keys() == {'inputs', 'label', 'mask'}


# ---------------------------------------------------------------------------------------------
# Each transform

def _image(height=8, width=6, channels=3):
  return np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)


def test_flip_mirrors_about_half_the_time():
  image = _image()
  flipped = [not np.array_equal(augment.flip(image, np.random.default_rng(s)), image)
             for s in range(200)]
  for s in range(5):
    out = augment.flip(image, np.random.default_rng(s))
    assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
  assert 70 < sum(flipped) < 130


def test_crop_keeps_the_shape_and_shifts_the_content():
  image = _image()
  shifts = set()
  for s in range(100):
    out = augment.crop(image, np.random.default_rng(s), padding=2)
    assert out.shape == image.shape and out.dtype == np.uint8
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    found = [(t, l) for t in range(5) for l in range(5)
             if np.array_equal(out, padded[t:t + 8, l:l + 6])]
    assert found
    shifts.add(found[0])
  assert len(shifts) > 15  # most of the 25 windows occur
  np.testing.assert_array_equal(augment.crop(image, np.random.default_rng(0), padding=0), image)


@pytest.mark.parametrize('channels', [1, 3])
def test_jitter_stays_in_range_and_keeps_the_shape(channels):
  image = _image(channels=channels)
  for s in range(20):
    out = augment.jitter(image, np.random.default_rng(s), np.float32([0.9, 0.9, 0.9]))
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
  changed = augment.jitter(image, np.random.default_rng(0), np.float32([0.5, 0.5, 0.5]))
  assert np.abs(changed - image).mean() > 1
  unchanged = augment.jitter(image, np.random.default_rng(0), np.float32([0, 0, 0]))
  np.testing.assert_allclose(unchanged, image, atol=1e-3)


@pytest.mark.parametrize('channels', [1, 3])
def test_brightness_alone_scales_every_pixel_by_one_factor(channels):
  image = _image(channels=channels)
  for s in range(10):
    out = augment.jitter(image, np.random.default_rng(s), np.float32([0.5, 0, 0]))
    kept = (out < 255) & (image > 0)  # not clipped
    ratios = out[kept] / image[kept]
    assert 0.5 - 1e-5 <= ratios.min() and ratios.max() <= 1.5 + 1e-5
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)


def test_mixup_is_the_weighted_sum():
  a, b = _image(), 255 - _image()
  for s in range(20):
    out, mix = augment.mixup(a, b, np.random.default_rng(s), alpha=0.4)
    assert 0 <= mix <= 1 and out.dtype == np.float32
    np.testing.assert_allclose(out, mix * a + (1 - mix) * b.astype(np.float32), rtol=1e-6)


def test_cutmix_weight_is_the_uncut_share():
  a, b = np.zeros((8, 6, 3), np.uint8), np.full((8, 6, 3), 255, np.uint8)
  weights = []
  for s in range(50):
    out, mix = augment.cutmix(a, b, np.random.default_rng(s), alpha=1.0)
    assert 0 <= mix <= 1 and out.shape == a.shape
    assert set(np.unique(out)) <= {0, 255}
    assert mix == pytest.approx((out[..., 0] == 0).mean())
    rows, cols = np.nonzero(out[..., 0])  # the pasted part is one box
    if len(rows):
      assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    weights.append(mix)
  assert len(set(weights)) > 10


def test_pipeline_mix_matches_its_labels_and_partners():
  source = _Images(np.arange(30) % 3)
  for batch in _batches(source, 4, augment='mixup', mixup_alpha=1.0):
    assert ((batch['mix'] >= 0) & (batch['mix'] <= 1)).all()
    for image, label, label_b, mix in zip(batch['inputs'], batch['label'], batch['label_b'],
                                          batch['mix']):
      # Some pair of records with these labels mixes into this image.
      pairs = [(i, j) for i in range(30) for j in range(30)
               if source[i]['label'] == label and source[j]['label'] == label_b]
      assert any(np.allclose(image * 255, mix * source[i]['inputs'].astype(np.float32) +
                             (1 - mix) * source[j]['inputs'], atol=1e-2) for i, j in pairs)


# ---------------------------------------------------------------------------------------------
# The mixed loss

def _loss(batch, smoothing=0.0):
  config = fashion_mnist_cnn.get_config()
  config.model.num_classes, config.task.label_smoothing = 4, smoothing
  logits = jnp.array([[2., 0., 1., -1.], [0., 3., 0., 1.]])
  return task_lib.Task(config, None).loss(lambda inputs, train, rngs: logits,
                                          {'inputs': None, **batch}, None)[0], logits


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixed_loss_weighs_the_two_labels(smoothing):
  labels, labels_b = jnp.array([0, 1]), jnp.array([2, 3])
  plain, logits = _loss({'label': labels}, smoothing)
  mixed, _ = _loss({'label': labels, 'label_b': labels_b, 'mix': jnp.ones(2)}, smoothing)
  assert float(mixed) == pytest.approx(float(plain), rel=1e-6)  # mix 1: plain cross-entropy
  other, _ = _loss({'label': labels_b}, smoothing)
  flipped, _ = _loss({'label': labels, 'label_b': labels_b, 'mix': jnp.zeros(2)}, smoothing)
  assert float(flipped) == pytest.approx(float(other), rel=1e-6)
  half, _ = _loss({'label': labels, 'label_b': labels_b, 'mix': jnp.full(2, 0.25)}, smoothing)
  assert float(half) == pytest.approx(0.25 * float(plain) + 0.75 * float(other), rel=1e-6)
  if smoothing:  # label smoothing still applies
    assert float(plain) != pytest.approx(float(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()))


def test_weighted_loss():
  labels = jnp.array([0, 1])
  plain, logits = _loss({'label': labels})
  weighted, _ = _loss({'label': labels, 'weight': jnp.array([2., 0.])})
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert float(weighted) == pytest.approx(float(per_example[0]), rel=1e-6)  # (2 l0 + 0) / 2
  assert float(plain) == pytest.approx(float(per_example.mean()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Class balance

SKEWED = np.repeat([0, 1, 2], [80, 15, 5])  # 80 / 15 / 5


def test_oversampling_makes_the_classes_near_uniform():
  source = _Images(np.random.default_rng(0).permutation(SKEWED))
  labels = _joined(_batches(source, 150, balance='oversample'), 'label')  # 12 epochs of 100
  np.testing.assert_array_equal(  # drawn from the seed: the same again, another for another
      labels[:200], _joined(_batches(source, 25, balance='oversample'), 'label'))
  assert not np.array_equal(labels[:200], _joined(
      _batches(source, 25, balance='oversample', shuffle_seed=5), 'label'))
  shares = np.bincount(labels, minlength=3) / len(labels)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.01)
  epoch = labels[:100]  # every epoch is 100 examples, the classes 34 / 33 / 33
  assert sorted(np.bincount(epoch)) == [33, 33, 34]
  plain = np.bincount(_joined(_batches(source, 25), 'label'), minlength=3) / 200
  np.testing.assert_allclose(plain, [0.8, 0.15, 0.05])  # without it: the source's shares


def test_oversampling_uses_every_minority_record():
  source = _Images(SKEWED)
  images = np.round(_joined(_batches(source, 25, balance='oversample')) * 255)
  seen = {i for i in range(95, 100) if any(np.array_equal(x, source[i]['inputs'])
                                           for x in images)}
  assert seen == set(range(95, 100))  # class 2's five records all appear


def test_reweight_weights_are_inverse_class_frequency_with_mean_one():
  weights = classification.class_weights(SKEWED, 4)  # class 3 has no records
  np.testing.assert_allclose(weights, [100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5), 0],
                             rtol=1e-6)
  assert weights[SKEWED].mean() == pytest.approx(1.0)
  source = _Images(SKEWED)
  for batch in _batches(source, 3, balance='reweight'):
    np.testing.assert_allclose(batch['weight'], weights[batch['label']], rtol=1e-6)
  mixed = _batches(source, 2, balance='reweight', augment='mixup')[1]
  np.testing.assert_allclose(mixed['weight'], mixed['mix'] * weights[mixed['label']] +
                             (1 - mixed['mix']) * weights[mixed['label_b']], rtol=1e-6)


def test_class_counts_skip_unreadable_records():
  labels = np.array([0, 2, -1, 2, 7])
  np.testing.assert_array_equal(classification.class_counts(labels, 3), [1, 0, 2])
  np.testing.assert_array_equal(classification.source_labels(_Images([1, 0, 2])), [1, 0, 2])


# ---------------------------------------------------------------------------------------------
# Config errors

@pytest.mark.parametrize('key, value, expected', [
    ('augment', 'flip,rotate', 'data.augment:'),
    ('augment', 'flip,flip', 'data.augment:'),
    ('crop_padding', -1, 'data.crop_padding:'),
    ('jitter_contrast', 1.5, 'data.jitter_contrast:'),
    ('mixup_alpha', 0.0, 'data.mixup_alpha:'),
    ('cutmix_alpha', -1.0, 'data.cutmix_alpha:'),
    ('balance', 'undersample', 'data.balance:'),
])
def test_bad_augment_and_balance_values_are_one_line_errors(key, value, expected):
  config = fashion_mnist_cnn.get_config('tiny')
  config.data[key] = value
  with pytest.raises(ValueError) as error:
    config_check.validate(config, num_devices=8, num_processes=1)
  assert str(error.value).startswith(expected) and '\n' not in str(error.value)


def test_image_augmentation_of_texts_is_a_config_error():
  d = _config(augment='flip', source='jsonl')
  with pytest.raises(ValueError, match=r"^data.augment: 'flip' augments images.*gives texts"):
    augment.names(d, 'text')
