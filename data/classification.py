"""Classification data: a source of {'inputs', 'label'} -> this process's rows of each batch.

Training reads an endless sequence of examples: epoch e is the source in a permutation drawn
from (shuffle_seed, e), epochs back to back, cut into global batches of `global_batch_size`.
Process p of P reads rows p*b .. (p+1)*b-1 of every global batch (b = global_batch_size / P),
and decodes only those, so the global batches are the same for any number of processes. A
record that cannot be used is counted in `RecordStats` and its slot is filled by the next usable
record of the source: dropping it would shift every later row and make the batches depend on
how processes share them. Augmentation draws from (shuffle_seed, position in that sequence), so
a resumed iterator repeats it bit for bit.

Evaluation reads the eval split once in source order; the last global batch is padded, and
eval batches (only they) carry 'mask': 1.0 for a real example, 0.0 for padding or an unusable
record.
"""

import functools
import sys

import grain
import ml_collections
import numpy as np

from data import images
from data.pipeline import RecordStats

IMAGE_SOURCES = ('idx', 'tfds', 'folder')
TEXT_SOURCES = ('csv', 'jsonl', 'stdlib_packages')  # data/text.py
_MAX_BAD_IN_A_ROW = 100  # so many unusable records in a row is a wrong path, not bad luck


def default_data_config() -> ml_collections.ConfigDict:
  """Every key the classification data reads."""
  d = ml_collections.ConfigDict()
  d.source = 'idx'  # idx | tfds | folder | csv | jsonl | stdlib_packages
  d.name = 'fashion_mnist'  # TFDS name, for source=tfds
  d.tfds_data_dir = ''  # '' = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  d.path = '/usr/share/datasets/fashion-mnist'  # idx/folder/csv/jsonl; Debian's Fashion-MNIST
  d.train_split = 'train'  # TFDS split, IDX prefix ('test' reads t10k-*) or folder name
  d.eval_split = 'test'
  d.eval_percent = 10  # folder without split subfolders: share of files hashed into eval
  d.class_names = ()  # idx: names for labels 0..; () = '0'..'9'
  d.image_size = ()  # (H, W): resize tfds/folder images to it; () = keep (folder: the first's)
  d.image_channels = 3  # folder: 1 (grey) or 3 (RGB)
  d.text_key = 'text'  # csv/jsonl field holding the text
  d.label_key = 'label'  # csv/jsonl field holding the label
  d.seq_len = 128  # text: token ids per example
  # Inputs become (pixel / 255 - mean) / std per channel. dataset: mean and std of a sample
  # of the train split; given: data.mean and data.std; none: mean 0, std 1.
  d.normalize = 'dataset'
  d.mean = ()
  d.std = ()
  d.normalize_sample = 10000  # train examples that normalize=dataset reads
  d.augment = 'none'  # none | flip_crop (random horizontal flip, random crop after 4-pixel pad)
  d.global_batch_size = 128
  d.shuffle_seed = 0
  d.worker_threads = 2  # threads that read and decode examples
  d.prefetch_batches = 4
  d.max_bad_fraction = 0.01  # the trainer stops when more of the records read are unusable
  d.warn_wait_share = 0.05  # warn when training waits for data more of the time than this
  return d


def make_source(data_cfg, split: str) -> grain.sources.RandomAccessDataSource:
  """The examples of `split` ('train' or 'eval') for `data_cfg.source`."""
  if split not in ('train', 'eval'):
    raise ValueError(f'split {split!r}: must be train or eval')
  if data_cfg.source in TEXT_SOURCES or (data_cfg.source == 'tfds' and _is_text_tfds(data_cfg)):
    from data import text  # pylint: disable=g-import-not-at-top; text sources are optional
    return text.make_text_source(data_cfg, split)
  if data_cfg.source in IMAGE_SOURCES:
    return images.make_image_source(data_cfg, split)
  raise ValueError(f'data.source: {data_cfg.source!r}; expected one of '
                   f'{", ".join(IMAGE_SOURCES + TEXT_SOURCES)}')


def _is_text_tfds(data_cfg) -> bool:
  from data import text  # pylint: disable=g-import-not-at-top; text sources are optional
  return text.is_text_tfds(data_cfg.name, data_cfg.tfds_data_dir)


def train_batches(source, data_cfg, *, process_index: int, process_count: int,
                  stats: RecordStats | None = None) -> grain.IterDataset:
  """Endless {'inputs': float32 [b, H, W, C] | int32 [b, seq_len], 'label': int32 [b]}."""
  d = data_cfg
  rows = _rows_per_process(d, process_count)
  if d.augment not in ('none', 'flip_crop') or (d.augment != 'none' and source.kind != 'image'):
    raise ValueError(f'data.augment: {d.augment!r}; expected none, or flip_crop for images')
  load = _loader(source, d, stats or RecordStats(), substitute=True)
  records = _ShuffledEpochs(len(source), d.shuffle_seed)
  first = process_index * rows

  def read(step):  # this process's rows of global batch `step`
    positions = step * d.global_batch_size + first + np.arange(rows)
    return _stack([load(index) for index in records(positions)])

  batches = grain.MapDataset.range(sys.maxsize).map(read)
  if d.augment == 'flip_crop':  # random numbers drawn per global batch, so per example
    batches = batches.random_map(functools.partial(
        flip_crop, global_batch_size=d.global_batch_size, first_row=first), seed=d.shuffle_seed)
  return _finished(batches, source, d)


def eval_batches(source, data_cfg, *, process_index: int, process_count: int,
                 stats: RecordStats | None = None) -> list[dict]:
  """The whole eval split, each example once, as this process's rows: 'inputs', 'label' and
  'mask' (float32 [b]; 0 for padding and unusable records)."""
  d = data_cfg
  rows = _rows_per_process(d, process_count)
  load = _loader(source, d, stats or RecordStats(), substitute=False)
  template = _loader(source, d, RecordStats(), substitute=True)(0)  # the first usable record
  padding = {k: np.zeros_like(v) for k, v in template.items()}

  def read(step):
    positions = step * d.global_batch_size + process_index * rows + np.arange(rows)
    found = [load(i) if i < len(source) else None for i in positions]
    batch = _stack([example or padding for example in found])
    return dict(batch, mask=np.float32([example is not None for example in found]))

  steps = -(-len(source) // d.global_batch_size)
  iterator = iter(_finished(grain.MapDataset.range(steps).map(read), source, d))
  try:
    return list(iterator)
  finally:
    iterator.close()  # stops its threads now rather than at garbage collection


class _ShuffledEpochs:
  """Position in the endless sequence -> record index: epoch e is a permutation from (seed, e).

  One numpy permutation per epoch: looking positions up one by one through Grain's
  `shuffle().repeat()` cost about 100 us each here, more than reading an MNIST image.
  """

  def __init__(self, size: int, seed: int):
    self._size, self._seed = size, seed
    self._recent = {}  # epoch -> permutation; prefetching threads read a few batches ahead

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._recent.get(epoch)
    if permutation is None:
      permutation = np.random.default_rng([self._seed, epoch]).permutation(self._size)
      self._recent = dict(list(self._recent.items())[-2:]) | {epoch: permutation}
    return permutation

  def __call__(self, positions: np.ndarray) -> list[int]:
    epochs, offsets = np.divmod(positions, self._size)
    return [int(self._permutation(int(e))[o]) for e, o in zip(epochs, offsets)]


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  return {'inputs': np.stack([e['inputs'] for e in examples]),
          'label': np.array([e['label'] for e in examples], dtype=np.int32)}


def _rows_per_process(d, process_count: int) -> int:
  if d.global_batch_size % process_count:
    raise ValueError(f'data.global_batch_size: {d.global_batch_size} does not split evenly '
                     f'over {process_count} processes')
  return d.global_batch_size // process_count


def _finished(batches: grain.MapDataset, source, d) -> grain.IterDataset:
  """Normalised batches, made by `worker_threads` threads up to `prefetch_batches` ahead."""
  read = grain.ReadOptions(num_threads=d.worker_threads,
                           prefetch_buffer_size=max(d.prefetch_batches, d.worker_threads))
  return batches.map(_finisher(source, d)).to_iter_dataset(read)


def _loader(source, d, stats: RecordStats, substitute: bool):
  """Record index -> {'inputs', 'label'} (token ids for text), counting what is unusable.

  With `substitute`, an unusable record gives the next usable one instead; else None.
  """
  if not len(source):
    raise ValueError(f'data: {source!r} has no examples')
  if source.kind == 'text':
    from data import text  # pylint: disable=g-import-not-at-top; text sources are optional
    encode = functools.partial(text.encode_for_classification, seq_len=d.seq_len)
  else:
    encode = lambda inputs: inputs  # pylint: disable=unnecessary-lambda-assignment

  def read(index):
    try:
      record = source[index]
      example = {'inputs': encode(record['inputs']), 'label': int(record['label'])}
      if not 0 <= example['label'] < source.num_classes:
        raise ValueError(f'label {example["label"]} outside 0..{source.num_classes - 1}')
    except Exception as e:  # pylint: disable=broad-except; a bad record must not stop training
      stats.count(f'{source.record_name(index)}: {type(e).__name__}: {e}')
      return None
    stats.count(None)
    return example

  def load(index):
    index %= len(source)
    if not substitute:
      return read(index)
    for tried in range(_MAX_BAD_IN_A_ROW):
      example = read((index + tried) % len(source))
      if example is not None:
        return example
    raise ValueError(f'{_MAX_BAD_IN_A_ROW} records in a row from '
                     f'{source.record_name(index)} on are unusable; see the data stats')

  return load


def _finisher(source, d):
  """Batch of raw examples -> model inputs: images normalised to float32, labels int32."""
  if source.kind == 'text':
    scale = shift = None
  else:
    mean, std = normalization(d)
    scale, shift = 1 / (255 * std), -mean / std

  def finish(batch):
    inputs = batch['inputs']
    out = {'inputs': inputs.astype(np.int32) if scale is None
                     else inputs.astype(np.float32) * scale + shift,
           'label': batch['label']}
    return dict(out, mask=batch['mask']) if 'mask' in batch else out

  return finish


def normalization(data_cfg) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) of pixel / 255, float32, as `data.normalize` says."""
  d = data_cfg
  if d.normalize == 'given':
    if not d.mean or len(d.mean) != len(d.std):
      raise ValueError(f'data.mean/data.std: {d.mean}/{d.std}; normalize=given needs one of '
                       'each per channel')
    return np.float32(d.mean), np.float32(d.std)
  if d.normalize == 'none':
    return np.float32([0.0]), np.float32([1.0])
  if d.normalize != 'dataset':
    raise ValueError(f'data.normalize: {d.normalize!r}; expected dataset | given | none')
  return _dataset_statistics(ml_collections.FrozenConfigDict(d))


@functools.lru_cache(maxsize=8)  # once per data config, shared by train and eval batches
def _dataset_statistics(frozen_data_cfg):
  train = images.make_image_source(frozen_data_cfg, 'train')
  picked = np.random.default_rng(0).permutation(len(train))[:frozen_data_cfg.normalize_sample]
  total = squares = count = 0
  for index in picked:
    try:
      image = train[int(index)]['inputs']
    except Exception:  # pylint: disable=broad-except; the pipeline counts unusable records
      continue
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64) / 255
    total, squares = total + pixels.sum(0), squares + (pixels ** 2).sum(0)
    count += len(pixels)
  if not count:
    raise ValueError('data.normalize: no usable train image to compute the mean and std of')
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0)) + 1e-6  # a constant channel: no /0
  return np.float32(mean), np.float32(std)


def flip_crop(batch, rng: np.random.Generator, *, global_batch_size: int, first_row: int):
  """CIFAR-style augmentation of uint8 images: random horizontal flip, then a random crop of
  the image padded by 4 black pixels a side. Draws for the whole global batch and uses rows
  first_row.., so an example's augmentation does not depend on how processes share the batch."""
  images = batch['inputs']
  rows, height, width = images.shape[:3]
  flips = (rng.random(global_batch_size) < 0.5)[first_row:first_row + rows]
  tops, lefts = rng.integers(0, 9, size=(2, global_batch_size))[:, first_row:first_row + rows]
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  out = np.stack([padded[i, t:t + height, l:l + width]
                  for i, (t, l) in enumerate(zip(tops, lefts))])
  out[flips] = out[flips, :, ::-1]
  return dict(batch, inputs=out)
