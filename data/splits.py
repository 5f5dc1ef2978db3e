"""Which records are train, validation and test (see data/classification.py's docstring).

A source's own validation split is used when it has one; otherwise validation is a holdout of
the training split, chosen from the record indices (and labels) and a seed, before any
per-process sharding, so that every process count and every resume sees the same one.
"""

import functools

import grain
import numpy as np
from etils import epath


def validation_split_name(data_cfg) -> str:
  """The source's own split that validates (`data.validation_split`), or '' for a holdout."""
  d = data_cfg
  if d.validation_split == 'holdout':
    return ''
  if d.validation_split != 'auto':
    return d.validation_split
  if d.source == 'folder':
    return next((n for n in ('val', 'validation')
                 if (epath.Path(d.path) / n).is_dir() and (epath.Path(d.path) / d.train_split)
                 .is_dir()), '')
  if d.source == 'tfds' and _tfds_splits(d.name, d.tfds_data_dir) & {'validation'}:
    return '' if tfds_test_split(d) == 'validation' else 'validation'
  return ''


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
