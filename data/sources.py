"""Random-access document sources: raw text (each item one document as UTF-8 bytes) or a
prepared dataset (each item one document's token ids), and weighted mixtures of them.

Sources only say where documents come from; `data/pipeline.py` does everything after that.

Splits: 'train', 'validation' (periodic evaluation and every choice made by it) and 'test'
(evaluated once, at the end). Files are split by a hash of their path's last two parts, seeded
by `data.split_seed`: the same split on every machine and for any number of processes. Of the
100 hash buckets, those below `data.validation_percent` validate and the top `data.test_percent`
test, so the test files stay the same whatever the validation share (seed 0 with the default 2
percent and no test files is the split podium has always made). TFDS reads the splits named by
`data.tfds_*_split`; a prepared dataset (`python -m prepare`) validates on its `eval` split and
tests on its `test` split when it has one (`prepare --test_percent`).
"""

import glob
import json
import os
import sysconfig
import zlib

import grain
import numpy as np
from etils import epath

from data.choices import Key, Registry, require

SPLITS = ('train', 'validation', 'test')
# Keys renamed with the three splits: their old names are refused with the new one.
RENAMED = {'eval_percent': 'validation_percent', 'tfds_eval_split': 'tfds_validation_split'}
PREPARED_FORMAT = 'podium-prepared-v1'


def stdlib_files() -> list[str]:
  """The Python standard library's own non-empty `.py` files: a corpus every Python carries.

  Left out: installed packages, and `_sysconfigdata_*.py`, a dump of this machine's build flags
  (not Python anyone wrote, and different on every machine)."""
  root = sysconfig.get_paths()['stdlib']
  files = glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
  return sorted(f for f in files if 'site-packages' not in os.path.relpath(f, root).split(os.sep)
                and not os.path.basename(f).startswith('_sysconfigdata') and os.path.getsize(f))


def glob_files(pattern: str) -> list[str]:
  """The files matching `pattern` (`*`, `?`, `[...]`, and `**` for any depth of folders), sorted,
  on local disk or in a bucket (gs://...)."""
  if '://' not in pattern:  # what epath does on a local disk, plus `**`
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  # epath's own glob refuses `**`; the filesystem it uses for buckets (fsspec) takes it.
  protocol = pattern.split('://')[0] + '://'
  found = epath.backend.fsspec_backend.fs(pattern).glob(pattern, detail=True)
  return sorted(protocol + p for p, info in found.items() if info['type'] == 'file')


class SplitAbsent(ValueError):
  """The source has no such split (a test split nobody asked for), which is not an error."""


def file_bucket(path: str, seed: int = 0) -> int:
  """0..99 from the path's last two parts (not the machine's install prefix) and `seed`."""
  tail = '/'.join(path.split(os.sep)[-2:])
  return zlib.crc32(tail.encode(), seed) % 100


def split_files(files: list[str], split: str, validation_percent: int, test_percent: int = 0,
                seed: int = 0) -> list[str]:
  """The files of `split`: buckets below validation_percent, the top test_percent, the rest."""
  def split_of(path):
    bucket = file_bucket(path, seed)
    return ('validation' if bucket < validation_percent else
            'test' if bucket >= 100 - test_percent else 'train')
  return [f for f in files if split_of(f) == split]


class FileSource(grain.sources.RandomAccessDataSource):
  """Whole files, read as bytes when asked for."""

  def __init__(self, paths: list[str]):
    self._paths = list(paths)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, index):
    return epath.Path(self._paths[index]).read_bytes()

  def record_name(self, index) -> str:
    return self._paths[index]

  def __repr__(self):
    return f'FileSource({len(self._paths)} files)'


class TfdsTextSource(grain.sources.RandomAccessDataSource):
  """One text feature of a TFDS dataset, through `tfds.data_source` (ArrayRecord, no TF)."""

  def __init__(self, name: str, split: str, text_key: str, split_key: str):
    """`split_key`: the config key that named `split`, for the error when it does not exist."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; optional and slow
    try:
      self._source = tfds.data_source(name, split=split)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'data.tfds_name: {e.args[0].splitlines()[0]}') from None
    except ValueError as e:  # a split the dataset does not have, or a bad slice
      raise ValueError(f'{split_key}: {split!r}: {str(e).splitlines()[0]}') from None
    self._text_key = text_key

  def __len__(self):
    return len(self._source)

  def record_name(self, index) -> str:
    return f'{self._source} record {index}'

  def __getitem__(self, index):
    text = self._source[index][self._text_key]
    return text.encode('utf-8') if isinstance(text, str) else bytes(text)


class PreparedDataset:
  """A directory written by `python -m prepare`, as its dataset.json describes it."""

  def __init__(self, path: str, key: str = 'data.path'):
    self.path, self._key = str(path).rstrip('/'), key
    meta = epath.Path(self.path) / 'dataset.json'
    try:
      self.info = json.loads(meta.read_text())
      ok = self.info.get('format') == PREPARED_FORMAT and all(
          k in self.info for k in ('tokenizer', 'vocab_size', 'eos_id', 'splits'))
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f'{key}: cannot read {meta}: {type(e).__name__}') from None
    if not ok:
      raise ValueError(f'{key}: {meta} is not a {PREPARED_FORMAT} description')

  @property
  def tokenizer_spec(self) -> str:
    """What data.tokenizers.load takes: 'bytes', or the tokenizer file beside the records."""
    name = self.info['tokenizer']
    return 'bytes' if name == 'bytes' else str(epath.Path(self.path) / name)

  def source(self, split: str) -> 'PreparedSource':
    """`split`'s documents: validation is the dataset's `eval` split."""
    name = 'eval' if split == 'validation' else split
    files = self.info['splits'].get(name, {}).get('files')
    if not files:
      error = SplitAbsent if split == 'test' else ValueError
      raise error(f'{self._key}: {self.path}/dataset.json lists no {name} files')
    return PreparedSource([str(epath.Path(self.path) / f) for f in files], self.path, name)


class PreparedSource(grain.sources.RandomAccessDataSource):
  """Documents as token ids (uint32): each ArrayRecord record is one document's ids, '<u4'."""

  def __init__(self, paths: list[str], directory: str, split: str):
    self._records, self.split = grain.sources.ArrayRecordDataSource(paths), split
    self._name = f'{directory}[{split}]'

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return np.frombuffer(self._records[index], '<u4')

  def record_name(self, index) -> str:
    return f'{self._name} record {index}'

  def __repr__(self):
    return f'PreparedSource({self._name}, {len(self)} documents)'


class Mixture:
  """Sources drawn from document by document in proportion to their weights (normalised)."""

  def __init__(self, components):  # [(source, weight > 0)]
    total = sum(w for _, w in components)
    self.components = [(source, w / total) for source, w in components]

  def __repr__(self):
    return 'Mixture(' + ', '.join(f'{s!r}: {w:.3g}' for s, w in self.components) + ')'


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'dir:weight,dir:weight' (dirs local or gs://) -> [(dir, weight)]; '' -> []."""
  parts = []
  for item in filter(None, (i.strip() for i in spec.split(','))):
    path, _, weight = item.rpartition(':')
    try:
      ok = bool(path) and float(weight) > 0 and np.isfinite(float(weight))
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f'data.mixture: {item!r} is not <prepared dir>:<positive weight>')
    parts.append((path, float(weight)))
  return parts


def prepared_datasets(data_config) -> list[tuple[PreparedDataset, float]]:
  """The prepared datasets of data.path or data.mixture, with their weights; [] for raw text."""
  if data_config.source != 'arrayrecord':
    return []
  if data_config.mixture:
    return [(PreparedDataset(p, 'data.mixture'), w) for p, w in parse_mixture(data_config.mixture)]
  return [(PreparedDataset(data_config.path), 1.0)]


def tokenizer_spec(data_config) -> str:
  """The run's tokenizer as data.tokenizers.load takes it: data.tokenizer for raw text ('' is
  bytes), the prepared datasets' own for arrayrecord (all of a mixture's must be the same)."""
  datasets = [d for d, _ in prepared_datasets(data_config)]
  if not datasets:
    return data_config.tokenizer or 'bytes'
  if data_config.tokenizer:
    raise ValueError('data.tokenizer: must be empty for data.source=arrayrecord: a prepared '
                     'dataset is read with the tokenizer it was prepared with')
  first = datasets[0]
  for other in datasets[1:]:
    if _tokenizer_identity(other) != _tokenizer_identity(first):
      raise ValueError(f'data.mixture: {other.path} was tokenised with another tokenizer than '
                       f'{first.path}; a mixture needs one tokenizer')
  return first.tokenizer_spec


def _tokenizer_identity(dataset: PreparedDataset):
  spec = dataset.tokenizer_spec
  try:
    contents = b'' if spec == 'bytes' else epath.Path(spec).read_bytes()
  except OSError as e:
    raise ValueError(f'data.mixture: cannot read {spec}: {e.strerror or e}') from None
  return dataset.info['vocab_size'], dataset.info['eos_id'], contents


SOURCES = Registry('data.source', 'where the documents come from')


def make_source(data_config, split: str):
  """The documents of `split` ('train', 'validation' or 'test') for the configured source;
  SplitAbsent when the source has no test split."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r}: must be one of {", ".join(SPLITS)}')
  return SOURCES[data_config.source].build(data_config, split)


def refuse_renamed(data_config):
  """ValueError for a key set under its old name (a config file can add any key)."""
  for old, new in RENAMED.items():
    require(old not in data_config, f'data.{old}', f'renamed data.{new}')


def _check_file_split(d, **_):
  for key in ('validation_percent', 'test_percent'):
    require(0 <= d[key] < 100, key, f'must be in [0, 100), got {d[key]}')
  require(d.validation_percent + d.test_percent < 100, 'test_percent',
          f'{d.test_percent} + validation_percent {d.validation_percent} leave no train files')
  require(0 <= d.split_seed < 2**32, 'split_seed', f'must be in [0, 2**32), got {d.split_seed}')


_FILE_SPLIT_KEYS = dict(
    validation_percent=Key(2, 'percent of the files (by a hash of the path) that validate'),
    test_percent=Key(0, 'percent of the files (by that hash, apart) that test; 0: none'),
    split_seed=Key(0, "the path hash's seed: which files each split gets"))


def _file_split(d, files: list[str], split: str):
  files = split_files(files, split, d.validation_percent, d.test_percent, d.split_seed)
  if split == 'test' and not d.test_percent:
    raise SplitAbsent('data.test_percent is 0: no files are held out for test')
  if not files:
    raise ValueError(f'data: no {split} files for source={d.source!r} '
                     f'files={d.get("files", "")!r} validation_percent={d.validation_percent} '
                     f'test_percent={d.test_percent}')
  return FileSource(files)


@SOURCES.register('stdlib', "the Python standard library's own .py files (no download)",
                  _check_file_split, **_FILE_SPLIT_KEYS)
def _stdlib(d, split):
  return _file_split(d, stdlib_files(), split)


def _check_files(d, **_):
  require(bool(d.files), 'files', "is empty but data.source='files'")
  _check_file_split(d)


@SOURCES.register(
    'files', 'text files, one document each', _check_files,
    files=Key('', "a glob, e.g. '/data/books/**/*.txt' (local or gs://)"), **_FILE_SPLIT_KEYS)
def _files(d, split):
  return _file_split(d, glob_files(d.files), split)


@SOURCES.register(
    'tfds', 'a TensorFlow Datasets text dataset, prepared beforehand',
    lambda d, **_: require(bool(d.tfds_name), 'tfds_name', "is empty but data.source='tfds'"),
    tfds_name=Key('', "e.g. 'lm1b'"), tfds_train_split='train',
    tfds_validation_split=Key('validation', "for a dataset without one, e.g. 'train[:1%]' "
                              "(and tfds_train_split='train[1%:]')"),
    tfds_test_split=Key('test', "evaluated once, at the end; '': none"), tfds_text_key='text')
def _tfds(d, split):
  key = f'tfds_{split}_split'
  if not d[key]:
    raise SplitAbsent(f'data.{key} is empty')
  return TfdsTextSource(d.tfds_name, d[key], d.tfds_text_key, f'data.{key}')


@SOURCES.register(
    'arrayrecord', 'prepared datasets (python -m prepare): data.path, or data.mixture',
    lambda d, **_: require(bool(d.path) != bool(d.mixture), 'path',
                           "set data.path or data.mixture (one of them) for "
                           "data.source='arrayrecord'"),
    path=Key('', 'a prepared dataset directory (local or gs://)'),
    mixture=Key('', "instead of path: prepared directories drawn from in proportion to their "
                "weights, e.g. '/data/web:0.7,gs://b/code:0.3'; one tokenizer for all"))
def _arrayrecord(d, split):
  """One prepared dataset's `split`, or a Mixture of several."""
  datasets = prepared_datasets(d)
  if len(datasets) == 1:
    return datasets[0][0].source(split)
  return Mixture([(dataset.source(split), w) for dataset, w in datasets])
