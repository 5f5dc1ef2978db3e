"""Random image augmentation for training, one example at a time, as Grain random maps.

`data.augment` is a comma-separated list of:
  flip    a horizontal mirror, half the time;
  crop    a random window of the image padded by `data.crop_padding` black pixels a side;
  jitter  brightness, contrast (and saturation, for RGB) each scaled by a factor drawn from
          [1 - s, 1 + s], s = `data.jitter_brightness`, `_contrast`, `_saturation`;
  mixup   the image blended with a partner's: mix * image + (1 - mix) * partner's, mix drawn
          from Beta(`data.mixup_alpha`, same) (Zhang et al. 2018);
  cutmix  a random box of the image replaced by the partner's box, the box's area share
          1 - mix with mix from Beta(`data.cutmix_alpha`, same) (Yun et al. 2019); mix is the
          share left uncut once the box is clipped to the image.
flip, crop and jitter apply in that order. With mixup or cutmix the example also carries
'label_b' (the partner's label) and 'mix' (float32), and the loss weighs the two labels by mix
and 1 - mix. With both listed, each example picks one of them with even odds (timm's
per-element mode): a choice per example, not per batch, keeps an example's augmentation
independent of the batch it lands in.

Randomness comes from Grain's `random_map`, whose generator is seeded by the op's seed and the
element's index; the index here is the example's position in the endless training sequence
(data/classification.py), i.e. its epoch and its slot in that epoch. The partner is the example
at a random slot of the same epoch, augmented as it is there. Nothing depends on the batch or on
how processes share it, and a resumed iterator repeats everything bit for bit.
"""

import grain
import numpy as np

TRANSFORMS = ('flip', 'crop', 'jitter', 'mixup', 'cutmix')
MIXES = ('mixup', 'cutmix')
_LUMA = np.float32([0.299, 0.587, 0.114])  # ITU-R 601 grey of an RGB pixel


def names(data_cfg, kind: str) -> tuple[str, ...]:
  """The transforms `data.augment` lists, checked along with their keys: ValueError if bad."""
  d = data_cfg
  listed = tuple(n.strip() for n in d.augment.split(',') if n.strip() not in ('', 'none'))
  unknown = [n for n in listed if n not in TRANSFORMS]
  if unknown or len(set(listed)) != len(listed):
    raise ValueError(f'data.augment: {d.augment!r}; expected none or a comma-separated list '
                     f'of distinct {", ".join(TRANSFORMS)}')
  if listed and kind != 'image':
    raise ValueError(f'data.augment: {d.augment!r} augments images, and data.source='
                     f'{d.source!r} gives {kind}s; use none')
  if not (isinstance(d.crop_padding, int) and d.crop_padding >= 0):
    raise ValueError(f'data.crop_padding: {d.crop_padding!r} is not a whole number >= 0')
  for key in ('jitter_brightness', 'jitter_contrast', 'jitter_saturation'):
    if not 0 <= d[key] <= 1:
      raise ValueError(f'data.{key}: {d[key]!r} is not in [0, 1]')
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if not d[key] > 0:
      raise ValueError(f'data.{key}: {d[key]!r} is not a positive number')
  return listed


def mixes(data_cfg) -> bool:
  """Whether training batches carry 'label_b' and 'mix'."""
  return any(n.strip() in MIXES for n in data_cfg.augment.split(','))


def _seed(data_cfg, op: int) -> int:
  """A seed of its own for each random op (1: distort, 2: mix), from `data.shuffle_seed`."""
  return int(np.random.SeedSequence([data_cfg.shuffle_seed, op]).generate_state(1)[0])


def apply(examples: grain.MapDataset, data_cfg, epoch_size: int) -> grain.MapDataset:
  """Position -> augmented {'inputs', 'label'[, 'label_b', 'mix']}; `examples` maps a position
  in the training sequence to its example, `epoch_size` positions an epoch."""
  d = data_cfg
  listed = names(d, 'image')
  if any(n in listed for n in ('flip', 'crop', 'jitter')):
    examples = examples.random_map(Distort(listed, d), seed=_seed(d, 1))
  if any(n in listed for n in MIXES):
    mix = Mix(examples, epoch_size, listed, d)
    examples = grain.MapDataset.range(len(examples)).random_map(mix, seed=_seed(d, 2))
  return examples


class Distort(grain.transforms.RandomMap):
  """flip, crop and jitter of one example's image."""

  def __init__(self, listed, data_cfg):
    self.listed, self.padding = listed, data_cfg.crop_padding
    self.strengths = (data_cfg.jitter_brightness, data_cfg.jitter_contrast,
                      data_cfg.jitter_saturation)

  def random_map(self, element, rng: np.random.Generator):
    image = element['inputs']
    if 'flip' in self.listed:
      image = flip(image, rng)
    if 'crop' in self.listed:
      image = crop(image, rng, self.padding)
    if 'jitter' in self.listed:
      image = jitter(image, rng, self.strengths)
    return dict(element, inputs=image)


class Mix(grain.transforms.RandomMap):
  """Position -> its example mixed with a partner from a random slot of the same epoch."""

  def __init__(self, examples: grain.MapDataset, epoch_size: int, listed, data_cfg):
    self.examples, self.epoch_size = examples, epoch_size
    self.alphas = {'mixup': data_cfg.mixup_alpha, 'cutmix': data_cfg.cutmix_alpha}
    self.choices = [n for n in MIXES if n in listed]

  def random_map(self, position, rng: np.random.Generator):
    epoch = position // self.epoch_size
    a = self.examples[position]
    b = self.examples[epoch * self.epoch_size + int(rng.random() * self.epoch_size)]
    how = self.choices[int(rng.random() * len(self.choices))]
    image, weight = (mixup if how == 'mixup' else cutmix)(
        a['inputs'], b['inputs'], rng, self.alphas[how])
    return {'inputs': image, 'label': a['label'], 'label_b': b['label'],
            'mix': np.float32(weight)}


def flip(image_HxWxC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image_HxWxC[:, ::-1] if rng.random() < 0.5 else image_HxWxC


def crop(image_HxWxC: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """A window of the image's size from the image padded by `padding` zeros a side: the image
  shifted by up to `padding` pixels each way, zeros filling in (np.pad took 10x longer)."""
  out = np.zeros_like(image_HxWxC)
  # rng.random, not rng.integers: 1 us against 8 here, per example
  shift_y, shift_x = (int(u * (2 * padding + 1)) - padding for u in rng.random(2).tolist())
  height, width = image_HxWxC.shape[:2]
  keep_h, keep_w = max(height - abs(shift_y), 0), max(width - abs(shift_x), 0)
  out_y, out_x = max(-shift_y, 0), max(-shift_x, 0)
  in_y, in_x = max(shift_y, 0), max(shift_x, 0)
  out[out_y:out_y + keep_h, out_x:out_x + keep_w] = (
      image_HxWxC[in_y:in_y + keep_h, in_x:in_x + keep_w])
  return out


def _grey(image_HxWxC: np.ndarray) -> np.ndarray:
  return image_HxWxC if image_HxWxC.shape[-1] == 1 else image_HxWxC @ _LUMA[:, None]


def jitter(image_HxWxC: np.ndarray, rng: np.random.Generator, strengths) -> np.ndarray:
  """float32 pixels in [0, 255]: brightness scaled, contrast scaled about the mean grey,
  saturation (RGB only) scaled about each pixel's grey, each by a factor in [1 - s, 1 + s]."""
  brightness, contrast, saturation = (1 + (2 * u - 1) * float(s)
                                      for u, s in zip(rng.random(3).tolist(), strengths))
  x = image_HxWxC.astype(np.float32)  # a copy, changed in place from here on
  x *= brightness
  np.clip(x, 0, 255, out=x)
  grey = _grey(x)
  mean = float(grey.sum()) / grey.size  # ndarray.mean costs 3x more on a small image
  x -= mean
  x *= contrast
  x += mean
  np.clip(x, 0, 255, out=x)
  if x.shape[-1] == 3:
    grey = _grey(x)  # after the contrast change
    x -= grey
    x *= saturation
    x += grey
    np.clip(x, 0, 255, out=x)
  return x


def mixup(a_HxWxC, b_HxWxC, rng: np.random.Generator, alpha: float):
  """(mix * a + (1 - mix) * b as float32, mix) with mix ~ Beta(alpha, alpha)."""
  mix = np.float32(rng.beta(alpha, alpha))
  return (mix * a_HxWxC.astype(np.float32, copy=False) +
          (1 - mix) * b_HxWxC.astype(np.float32, copy=False), mix)


def cutmix(a_HxWxC, b_HxWxC, rng: np.random.Generator, alpha: float):
  """(a with a box of b pasted in, as float32; the share of a left). The box has area share
  1 - Beta(alpha, alpha) and a uniformly drawn centre, and is clipped to the image."""
  height, width = a_HxWxC.shape[:2]
  side = np.sqrt(1 - rng.beta(alpha, alpha))
  centre_y, centre_x = (int(u * n) for u, n in zip(rng.random(2).tolist(), (height, width)))
  half_h, half_w = int(height * side) // 2, int(width * side) // 2
  top, bottom = max(centre_y - half_h, 0), min(centre_y + half_h, height)
  left, right = max(centre_x - half_w, 0), min(centre_x + half_w, width)
  out = a_HxWxC.astype(np.float32)  # a copy
  out[top:bottom, left:right] = b_HxWxC[top:bottom, left:right]
  return out, np.float32(1 - (bottom - top) * (right - left) / (height * width))
