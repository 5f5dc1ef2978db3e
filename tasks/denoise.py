"""Image denoising (task.name='denoise'): the model gets an image with Gaussian noise added and
is trained to give back the clean image.

Images come from the classification data's image sources and splits (data/classification.py:
validation for every periodic evaluation and all model selection, test once at the end; the
labels are read and left unused), with `data.normalize=none`: pixels in [0, 1]. The noise,
N(0, task.noise_std^2) per pixel, is added on the device, each example's drawn from a key and
its row: in training the step's random key (from the seed and the step, so a resumed run adds
the same noise) and the row in the batch; in evaluation `task.eval_noise_seed` and the example's
position in its split, so every evaluation sees the same noisy images, for any batch size or
number of processes.

Batches are {'inputs': clean images, float32 [B, H, W, C] (H, W, C from `model.image_shape`)};
eval batches also carry 'index' (int32 [B], each example's position in its split) and 'mask'
(1 for a real example, 0 for padding). The model is called as `model(noisy, train=...,
rngs=...)` and returns the denoised images [B, H, W, C].

Loss: the mean squared error per pixel. Eval figures: mse (the same over the whole split), psnr
(the mean over images of their peak signal-to-noise ratio, in dB, the peak being 1) and
noisy_psnr (that of the noisy inputs: what the model starts from).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import augment
from data import classification as data_lib
from tasks import base


def default_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = 'denoise'
  t.noise_std = 0.3  # the noise's standard deviation, in pixels of [0, 1]
  t.eval_noise_seed = 0  # validation and test noise: the same for every run and evaluation
  return t


def default_data_config() -> ml_collections.ConfigDict:
  d = data_lib.default_data_config()
  d.normalize = 'none'  # pixels in [0, 1]: what the noise and PSNR are measured in
  return d


def noise(images_BxHxWxC, key, rows_B, std: float):
  """N(0, std^2) noise like the images; row i's drawn from fold_in(key, rows_B[i]) alone."""
  shape = images_BxHxWxC.shape[1:]
  # Drawn flat: XLA:CPU compiles the threefry sampler for a 1-D shape much faster than for a
  # 3-D one (models/initializers.py).
  draw = lambda row: jax.random.normal(jax.random.fold_in(key, row), (math.prod(shape),))
  return std * jax.vmap(draw)(rows_B).reshape(images_BxHxWxC.shape)


def _per_image_mse(a_BxHxWxC, b_BxHxWxC):
  return jnp.mean(jnp.square(a_BxHxWxC - b_BxHxWxC), axis=(1, 2, 3))


def _psnr(mse_B):
  return -10 * jnp.log10(jnp.maximum(mse_B, 1e-10))  # peak 1; a perfect image counts as 100 dB


CHOICES = (data_lib.SOURCES,)  # the data section's registered choices


class Task(base.Task):
  """Mean squared error between the denoised and the clean image."""
  unit = 'images'
  larger_is_better = ('psnr',)

  def validate(self):
    d, t = self.config.data, self.config.task
    _require('image_shape' in self.config.model, 'model.name',
             f'{self.config.model.name!r} takes no images; denoising needs an image model')
    data_lib.SOURCES.validate(d, takes='images', model=self.config.model.name)
    _require(d.normalize == 'none', 'data.normalize',
             f'{d.normalize!r}; denoising measures noise and PSNR in pixels of [0, 1]: use none')
    augment.names(d, 'image')
    _require(not augment.mixes(d), 'data.augment',
             f'{d.augment!r}; mixup and cutmix blend labels, which denoising has none of')
    data_lib.check_balance(d)
    _require(d.balance != 'reweight', 'data.balance',
             'reweight weighs classes in a loss that has none; use none or oversample')
    _require(0 < d.validation_fraction < 1, 'data.validation_fraction',
             f'{d.validation_fraction} is not in (0, 1)')
    _require(t.noise_std > 0, 'task.noise_std', f'must be positive, got {t.noise_std}')

  def batch_spec(self, split):
    size = self.config.data.global_batch_size
    spec = {'inputs': base.Field((size, *self.config.model.image_shape), jnp.float32,
                                 ('batch', None, None, None))}
    if split == 'eval':
      spec.update(index=base.Field((size,), jnp.int32, ('batch',)),
                  mask=base.Field((size,), jnp.float32, ('batch',)))
    return spec

  def loss(self, model, batch, rngs):
    clean = batch['inputs']
    # The step's random stream (training/step.py: from the seed and the step).
    key = rngs.dropout()
    noisy = clean + noise(clean, key, jnp.arange(clean.shape[0]), self.config.task.noise_std)
    return jnp.mean(jnp.square(model(noisy, train=True, rngs=rngs) - clean)), {}

  def eval_sums(self, model, batch):
    clean, mask_B = batch['inputs'], batch['mask']
    key = jax.random.key(self.config.task.eval_noise_seed)
    noisy = clean + noise(clean, key, batch['index'], self.config.task.noise_std)
    mse_B = _per_image_mse(model(noisy, train=False), clean)
    return {'squared_error': jnp.sum(mse_B * mask_B), 'count': jnp.sum(mask_B),
            'psnr': jnp.sum(_psnr(mse_B) * mask_B),
            'noisy_psnr': jnp.sum(_psnr(_per_image_mse(noisy, clean)) * mask_B)}

  def eval_metrics(self, sums):
    count = max(float(sums['count']), 1.0)
    return {'mse': float(sums['squared_error']) / count, 'psnr': float(sums['psnr']) / count,
            'noisy_psnr': float(sums['noisy_psnr']) / count}

  def train_batches(self, stats):
    source = self._source('train')
    return data_lib.train_batches(source, self.config.data, process_index=jax.process_index(),
                                  process_count=jax.process_count(), stats=stats)

  def split_batches(self, split):
    d = self.config.data
    batches = data_lib.eval_batches(self._source(split), d, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    first, rows = base.process_rows(d.global_batch_size)
    return [dict(batch, index=np.int32(step * d.global_batch_size + first + np.arange(rows)))
            for step, batch in enumerate(batches)]

  def _source(self, split):
    source = data_lib.make_source(self.config.data, split)
    shape = tuple(self.config.model.image_shape)
    _require(source.kind == 'image', 'data.name', f'{source!r} holds {source.kind}s, not images')
    if len(source):
      found = tuple(source[0]['inputs'].shape)
      _require(found == shape, 'model.image_shape',
               f'{shape}, but the images of {source!r} are {found}')
    return source


def _require(ok, key, message):
  if not ok:
    raise ValueError(f'{key}: {message}')
