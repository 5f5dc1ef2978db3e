"""Which records are train, validation and test (see data/classification.py's docstring).

A source's own validation split is used when it has one; otherwise validation is a holdout of
the training split, chosen from the record indices (and labels) and a seed, before any
per-process sharding, so that every process count and every resume sees the same one.
"""

import functools

import grain
import numpy as np

from data.choices import Key, Registry, require

# The entries are registered where each source is: data/images.py (idx, cifar_bin, folder) and
# data/text.py (csv, jsonl, stdlib_packages, tfds: images or texts). An entry's build(data_cfg,
# split) gives the examples of 'train', 'test' or 'validation'; for validation, None where the
# source has none of its own (`split_name` is None), and a holdout is carved from train instead.
SOURCES = Registry('data.source', 'where the labelled examples come from')

# Keys that several sources read (entries that share a key declare it alike).
PATH = Key('/usr/share/datasets/fashion-mnist',
           "the data's folder (csv, jsonl: or a file or glob), local or gs://; default: Debian's "
           'Fashion-MNIST')
TRAIN_SPLIT = Key('train', "the training split: TFDS's, the IDX prefix, a folder or files' prefix")
TEST_SPLIT = Key('test', "evaluated once, at the end of training ('test' of IDX reads t10k-*)")
TEST_PERCENT = Key(10, 'without split folders or files: the share of records hashed into test')


def gives(kind: str, also=lambda d: None):
  """An entry's check that its `kind` of examples ('images', 'texts') is what the model takes
  (context: `takes`, `model`), then `also(data_cfg)`."""
  def check(d, *, takes: str, model: str):
    require(takes == kind, 'source',
            f'{d.source!r} gives {kind}, and model.name={model!r} takes {takes}')
    also(d)
  return check


def split_name(data_cfg, split: str, own_validation=lambda: '') -> str | None:
  """The source's own name of `split`: data.train_split, data.test_split, or data.validation_split
  (for 'auto', `own_validation()`: the source's validation split, or ''); None for a holdout."""
  if split != 'validation':
    return data_cfg[f'{split}_split']
  if data_cfg.validation_split == 'auto':
    return own_validation() or None
  return None if data_cfg.validation_split == 'holdout' else data_cfg.validation_split


# TFDS datasets whose usual test split is not 'test': glue's test labels are hidden, so its
# validation split is the one that tests.
TFDS_TEST_SPLITS = {'glue/sst2': 'validation'}


def tfds_entry(table: dict, name: str):
  """`table`'s value for the TFDS dataset `name` (a key also stands for its versions, `k:1.0.0`,
  and its configs, `k/...`), or None."""
  base = name.split(':')[0]
  return next((v for k, v in table.items() if base == k or base.startswith(k + '/')), None)


def tfds_test_split(data_cfg) -> str:
  """The TFDS split that tests: data.test_split, or for '' the dataset's usual one."""
  return data_cfg.test_split or tfds_entry(TFDS_TEST_SPLITS, data_cfg.name) or 'test'


def tfds_validation_split(data_cfg) -> str:
  """'validation' where the TFDS dataset has that split and it is not the one that tests."""
  d = data_cfg
  has_it = 'validation' in _tfds_splits(d.name, d.tfds_data_dir)
  return 'validation' if has_it and tfds_test_split(d) != 'validation' else ''


@functools.lru_cache(maxsize=8)
def _tfds_splits(name: str, data_dir: str) -> frozenset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; slow to import
  try:
    return frozenset(tfds.builder(name, data_dir=data_dir or None).info.splits)
  except Exception:  # pylint: disable=broad-except; reading the split says what is wrong
    return frozenset()


def holdout(labels: np.ndarray | None, size: int, fraction: float, seed: int) -> np.ndarray:
  """bool [size]: the records held out for validation, `fraction` of each class (rounded half
  to even; of all records when `labels` is None), each class's drawn from (seed, class).
  Depends on the records' indices and labels only, never on the processes."""
  if not 0 < fraction < 1:
    raise ValueError(f'data.validation_fraction: {fraction} is not in (0, 1)')
  strata = np.zeros(size, np.int64) if labels is None else np.asarray(labels, np.int64)
  held_out = np.zeros(size, bool)
  for stratum in np.unique(strata):  # -1: unreadable records, a stratum of their own
    members = np.flatnonzero(strata == stratum)
    picked = np.random.default_rng([seed, stratum + 1]).permutation(members)
    held_out[picked[:round(fraction * len(members))]] = True
  return held_out


class Subset(grain.sources.RandomAccessDataSource):
  """The records `indices` of `source` (the training split less its holdout, or the holdout)."""

  def __init__(self, source, indices: np.ndarray, split: str):
    self._source, self._indices, self._split = source, indices, split
    self.kind, self.num_classes = source.kind, source.num_classes
    self.class_names = source.class_names
    if hasattr(source, 'labels'):
      self.labels = lambda: np.asarray(source.labels())[indices]
    if hasattr(source, 'stats'):
      self.stats = source.stats

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._source[int(self._indices[index])]

  def record_name(self, index) -> str:
    return self._source.record_name(int(self._indices[index]))

  def indices(self) -> np.ndarray:
    """The records of the whole training split this subset holds."""
    return self._indices

  def __repr__(self):
    return f'{self._split} part of {self._source!r} ({len(self)} records)'
