"""Classification data: a source of {'inputs', 'label'} -> this process's rows of each batch.

Training reads an endless sequence of examples: epoch e is the source in a permutation drawn
from (shuffle_seed, e), epochs back to back, cut into global batches of `global_batch_size`.
Process p of P reads rows p*b .. (p+1)*b-1 of every global batch (b = global_batch_size / P),
and decodes only those, so the global batches are the same for any number of processes. A
record that cannot be used is counted in `RecordStats` and its slot is filled by the next usable
record of the source: dropping it would shift every later row and make the batches depend on
how processes share them. Augmentation (data/augment.py) draws per example from (shuffle_seed,
position in that sequence), so a resumed iterator repeats it bit for bit.

Class balance (`data.balance`): `reweight` adds 'weight' (float32 [b]) to training batches,
N / (K * count[class]) for N usable records of K present classes, so the mean weight over the
data is 1 (a mixed example weighs mix * its class's + (1 - mix) * its partner's); `oversample`
makes epoch e a list of N slots, each class in an equal share of them (in an order drawn from
(seed, e)), a class's slots filled from its records in a permutation drawn from (seed, e, class)
(repeated as often as needed), so every class is equally likely and an epoch is still N
examples, not one pass over each record.

Splits: `make_source(data_cfg, split)` gives 'train', 'validation' or 'test'. Validation is the
source's own split when it has one (`data.validation_split`: auto takes TFDS 'validation' or a
folder's `val/` or `validation/`), else a holdout carved from the training split: a share
`data.validation_fraction` of each class (of all records when the source has no label index,
TFDS), drawn from (`data.validation_seed`, class) by record index before any per-process
sharding, so it is the same set for any number of processes and across resumes, and training
never reads it. Periodic evaluation, early stopping, reduce_on_plateau and `best/` read
validation; the test split is evaluated once, at the end of training.

Evaluation reads a split once in source order; the last global batch is padded, and
eval batches (only they) carry 'mask': 1.0 for a real example, 0.0 for padding or an unusable
record.
"""

import functools
import sys
import time

import grain
import ml_collections
import numpy as np

from data import augment
from data import images, text  # noqa: F401  (importing them registers their data.source entries)
from data import pipeline
from data import splits
from data.pipeline import RecordStats
from data.splits import SOURCES

SPLITS = ('train', 'validation', 'test')
_MAX_BAD_IN_A_ROW = 100  # so many unusable records in a row is a wrong path, not bad luck


def default_data_config() -> ml_collections.ConfigDict:
  """Every key the classification data reads."""
  d = ml_collections.ConfigDict()
  SOURCES.declare(d, 'idx')
  # auto: the source's validation split (TFDS 'validation', a folder's val/ or validation/)
  # if it has one, else a holdout; holdout: always carved from train; or a split's name.
  d.validation_split = 'auto'
  d.validation_fraction = 0.1  # holdout: the share of each class's train records held out
  d.validation_seed = 0  # holdout: which records (the same for any process count)
  d.seq_len = 128  # text: token ids per example
  # text: '' (bytes) or a Hugging Face tokenizer.json with [CLS], [SEP], [MASK], [PAD] = 0
  # (BERT's WordPiece; `python -m tools.hf import` names it), data/tokenizers.py's Vocabulary.
  d.tokenizer = ''
  # Inputs become (pixel / 255 - mean) / std per channel. dataset: mean and std of a sample
  # of the train split; given: data.mean and data.std; none: mean 0, std 1.
  d.normalize = 'dataset'
  d.mean = ()
  d.std = ()
  d.normalize_sample = 10000  # train examples that normalize=dataset reads
  # Training images only: none, or a comma-separated list of flip, crop, jitter, mixup,
  # cutmix (data/augment.py).
  d.augment = 'none'
  d.crop_padding = 4  # crop: black pixels added a side before the random crop
  d.jitter_brightness = 0.4  # jitter: each factor is drawn from [1 - s, 1 + s]
  d.jitter_contrast = 0.4
  d.jitter_saturation = 0.4  # RGB only
  d.mixup_alpha = 0.2  # mixup: the mix weight ~ Beta(alpha, alpha)
  d.cutmix_alpha = 1.0  # cutmix: the uncut share ~ Beta(alpha, alpha)
  d.balance = 'none'  # none | reweight | oversample (training only; see above)
  d.global_batch_size = 128
  d.shuffle_seed = 0
  d.worker_threads = 0  # threads that read, augment and batch examples (0: half the CPUs, <= 16)
  d.prefetch_batches = 4
  d.max_bad_fraction = 0.01  # the trainer stops when more of the records read are unusable
  d.warn_wait_share = 0.05  # warn when training waits for data more of the time than this
  return d


def make_source(data_cfg, split: str) -> grain.sources.RandomAccessDataSource:
  """The examples of `split` ('train', 'validation' or 'test') for `data_cfg.source`."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r}: must be one of {", ".join(SPLITS)}')
  build = SOURCES.chosen(data_cfg).build
  if split == 'test':
    return build(data_cfg, 'test')
  validation = build(data_cfg, 'validation')  # None: the source has none of its own
  if validation is not None:
    return validation if split == 'validation' else build(data_cfg, 'train')
  train = build(data_cfg, 'train')
  # Stratified when the source has a label index; reading every TFDS record would be slow.
  labels = source_labels(train) if hasattr(train, 'labels') else None
  held_out = splits.holdout(labels, len(train), data_cfg.validation_fraction,
                            data_cfg.validation_seed)
  kept = np.flatnonzero(held_out == (split == 'validation'))
  if not len(kept):
    raise ValueError(f'data.validation_fraction: {data_cfg.validation_fraction} leaves no '
                     f'{split} example of the {len(train)} in {train!r}')
  return splits.Subset(train, kept, split)


def train_batches(source, data_cfg, *, process_index: int, process_count: int,
                  stats: RecordStats | None = None, labels=None) -> grain.IterDataset:
  """Endless {'inputs': float32 [b, H, W, C] | int32 [b, seq_len], 'label': int32 [b]}, and
  'label_b' and 'mix' with mixup or cutmix, 'weight' with balance=reweight. `labels`: the
  source's labels (`source_labels`), if already read."""
  d = data_cfg
  rows = _rows_per_process(d, process_count)
  augment.names(d, source.kind)
  check_balance(d)
  stats = stats or RecordStats()
  load = _loader(source, d, stats, substitute=True)
  if d.balance != 'none' and labels is None:
    labels = source_labels(source)
  records = (_BalancedEpochs(labels, d.shuffle_seed) if d.balance == 'oversample' else
             _ShuffledEpochs(len(source), d.shuffle_seed))
  examples = grain.MapDataset.range(sys.maxsize).map(lambda p: load(records(p)))
  if source.kind == 'image':
    examples = augment.apply(examples, d, len(source))
  weights = class_weights(labels, source.num_classes) if d.balance == 'reweight' else None
  first, finish = process_index * rows, _finisher(source, d)
  threads = pipeline.resolve_threads(d.worker_threads)

  def read(step):  # this process's rows of global batch `step`
    positions = step * d.global_batch_size + first + np.arange(rows)
    batch = _stack([examples[int(p)] for p in positions])
    if weights is not None and 'mix' in batch:
      mix = batch['mix']
      batch['weight'] = np.float32(mix * weights[batch['label']] +
                                   (1 - mix) * weights[batch['label_b']])
    elif weights is not None:
      batch['weight'] = weights[batch['label']].astype(np.float32)
    return batch

  def make(step):  # timed: data/pipeline_images_per_second (see pipeline.RecordStats)
    started = time.perf_counter()
    batch = finish(read(step))
    stats.add_batch_work(time.perf_counter() - started, threads=threads)
    return batch

  return _prefetched(grain.MapDataset.range(sys.maxsize).map(make), d, threads)


def eval_batches(source, data_cfg, *, process_index: int, process_count: int,
                 stats: RecordStats | None = None) -> list[dict]:
  """The whole of an evaluated split (validation or test), each example once, as this process's
  rows: 'inputs', 'label' and 'mask' (float32 [b]; 0 for padding and unusable records)."""
  d = data_cfg
  rows = _rows_per_process(d, process_count)
  load = _loader(source, d, stats or RecordStats(), substitute=False)
  template = _loader(source, d, RecordStats(), substitute=True)(0)  # the first usable record
  padding = {k: np.zeros_like(v) for k, v in template.items()}
  finish = _finisher(source, d)

  def read(step):
    positions = step * d.global_batch_size + process_index * rows + np.arange(rows)
    found = [load(i) if i < len(source) else None for i in positions]
    batch = _stack([example or padding for example in found])
    return finish(dict(batch, mask=np.float32([example is not None for example in found])))

  steps = -(-len(source) // d.global_batch_size)
  iterator = iter(_prefetched(grain.MapDataset.range(steps).map(read), d,
                              pipeline.resolve_threads(d.worker_threads)))
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
    self._recent = {}  # epoch -> record order; prefetching threads read a few batches ahead

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._size)

  def __call__(self, position: int) -> int:
    epoch, offset = divmod(int(position), self._size)
    order = self._recent.get(epoch)
    if order is None:
      order = self._order(epoch)
      self._recent = dict(list(self._recent.items())[-2:]) | {epoch: order}
    return int(order[offset])


class _BalancedEpochs(_ShuffledEpochs):
  """data.balance=oversample: epoch e is len(labels) slots, each class in an equal share of
  them; a class's slots take its records in permutations drawn from (seed, e, class)."""

  def __init__(self, labels: np.ndarray, seed: int):
    super().__init__(len(labels), seed)
    self._pools = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    if not self._pools:
      raise ValueError('data.balance: no training record has a usable label')

  def _order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    classes = rng.permutation(np.arange(self._size) % len(self._pools))
    order = np.empty(self._size, np.int64)
    for c, pool in enumerate(self._pools):
      slots = np.flatnonzero(classes == c)
      rounds = -(-len(slots) // len(pool))
      picks = np.concatenate([np.random.default_rng([self._seed, epoch, c, r]).permutation(pool)
                              for r in range(rounds)])
      order[slots] = picks[:len(slots)]
    return order


def source_labels(source) -> np.ndarray:
  """int64 [len(source)]: each record's label, -1 where it cannot be read or is not a class.
  Sources that hold their labels offer `labels()`; others are read record by record (TFDS:
  every record decoded, so only data.balance asks for them)."""
  if hasattr(source, 'labels'):
    labels = np.asarray(source.labels(), np.int64)
  else:
    labels = np.full(len(source), -1, np.int64)
    for index in range(len(source)):
      try:
        labels[index] = int(source[index]['label'])
      except Exception:  # pylint: disable=broad-except; the pipeline counts unusable records
        continue
  return np.where((labels >= 0) & (labels < source.num_classes), labels, -1)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [num_classes]: records per class (unreadable ones and stray labels not counted)."""
  return np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [num_classes]: N / (K * count[class]) over the K classes present (0 for a class
  with no records), so the mean weight over the N usable records is 1."""
  counts = class_counts(labels, num_classes)
  present = counts > 0
  weights = np.zeros(num_classes, np.float64)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return np.float32(weights)


def check_balance(data_cfg):
  if data_cfg.balance not in ('none', 'reweight', 'oversample'):
    raise ValueError(f'data.balance: {data_cfg.balance!r}; expected none | reweight | '
                     'oversample')


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  """Examples -> a batch: 'inputs' stacked, labels int32, 'mix' float32."""
  batch = {'inputs': np.stack([e['inputs'] for e in examples])}
  for key, dtype in (('label', np.int32), ('label_b', np.int32), ('mix', np.float32)):
    if key in examples[0]:
      batch[key] = np.array([e[key] for e in examples], dtype=dtype)
  return batch


def _rows_per_process(d, process_count: int) -> int:
  if d.global_batch_size % process_count:
    raise ValueError(f'data.global_batch_size: {d.global_batch_size} does not split evenly '
                     f'over {process_count} processes')
  return d.global_batch_size // process_count


def _prefetched(batches: grain.MapDataset, d, threads: int) -> grain.IterDataset:
  """`batches`, made by `threads` threads up to `data.prefetch_batches` ahead."""
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(d.prefetch_batches,
                                                                         threads))
  return batches.to_iter_dataset(read)


def _loader(source, d, stats: RecordStats, substitute: bool):
  """Record index -> {'inputs', 'label'} (token ids for text), counting what is unusable.

  With `substitute`, an unusable record gives the next usable one instead; else None.
  """
  if not len(source):
    raise ValueError(f'data: {source!r} has no examples')
  if source.kind == 'text':
    from data import tokenizers  # pylint: disable=g-import-not-at-top; text sources are optional
    encode = functools.partial(tokenizers.Vocabulary(d.tokenizer).classification_row,
                               seq_len=d.seq_len)
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
    return dict(batch, inputs=inputs.astype(np.int32) if scale is None
                else inputs.astype(np.float32, copy=False) * scale + shift)

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
  train = make_source(frozen_data_cfg, 'train')  # the holdout's pixels stay unseen
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
