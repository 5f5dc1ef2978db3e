"""Random-access document sources: raw text (each item one document as UTF-8 bytes) or a
prepared dataset (each item one document's token ids), and weighted mixtures of them.

Sources only say where documents come from; `data/pipeline.py` does everything after that.
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

SPLITS = ('train', 'eval')
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


def split_files(files: list[str], split: str, eval_percent: int) -> list[str]:
  """Deterministic split on the file name, independent of the machine's install prefix."""
  def is_eval(path):
    tail = '/'.join(path.split(os.sep)[-2:])
    return zlib.crc32(tail.encode()) % 100 < eval_percent
  return [f for f in files if is_eval(f) == (split == 'eval')]


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

  def __init__(self, name: str, split: str, text_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; optional and slow
    try:
      self._source = tfds.data_source(name, split=split)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'data.tfds_name: {e.args[0].splitlines()[0]}') from None
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
    files = self.info['splits'].get(split, {}).get('files')
    if not files:
      raise ValueError(f'{self._key}: {self.path}/dataset.json lists no {split} files')
    return PreparedSource([str(epath.Path(self.path) / f) for f in files], self.path, split)


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
  """The documents of `split` ('train' or 'eval') for the configured source."""
  return SOURCES[data_config.source].build(data_config, split)


def _file_split(d, files: list[str], split: str):
  files = split_files(files, split, d.eval_percent)
  if not files:
    raise ValueError(f'data: no {split} files for source={d.source!r} '
                     f'files={d.get("files", "")!r} eval_percent={d.eval_percent}')
  return FileSource(files)


@SOURCES.register('stdlib', "the Python standard library's own .py files (no download)")
def _stdlib(d, split):
  return _file_split(d, stdlib_files(), split)


@SOURCES.register(
    'files', 'text files, one document each',
    lambda d, **_: require(bool(d.files), 'files', "is empty but data.source='files'"),
    files=Key('', "a glob, e.g. '/data/books/**/*.txt' (local or gs://)"))
def _files(d, split):
  return _file_split(d, glob_files(d.files), split)


@SOURCES.register(
    'tfds', 'a TensorFlow Datasets text dataset, prepared beforehand',
    lambda d, **_: require(bool(d.tfds_name), 'tfds_name', "is empty but data.source='tfds'"),
    tfds_name=Key('', "e.g. 'lm1b'"), tfds_train_split='train', tfds_eval_split='test',
    tfds_text_key='text')
def _tfds(d, split):
  tfds_split = d.tfds_train_split if split == 'train' else d.tfds_eval_split
  return TfdsTextSource(d.tfds_name, tfds_split, d.tfds_text_key)


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
