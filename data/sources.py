"""Random-access text sources. Each item is one document as UTF-8 bytes.

Sources only say where documents come from; `data/pipeline.py` does everything after that.
"""

import glob
import os
import sysconfig
import zlib

import grain
from etils import epath

SPLITS = ('train', 'eval')


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


def make_source(data_config, split: str) -> grain.sources.RandomAccessDataSource:
  """The documents of `split` ('train' or 'eval') for the configured source."""
  if data_config.source == 'tfds':
    tfds_split = data_config.tfds_train_split if split == 'train' else data_config.tfds_eval_split
    return TfdsTextSource(data_config.tfds_name, tfds_split, data_config.tfds_text_key)
  if data_config.source == 'stdlib':
    files = stdlib_files()
  else:
    files = glob_files(data_config.files)
  files = split_files(files, split, data_config.eval_percent)
  if not files:
    raise ValueError(f'data: no {split} files for source={data_config.source!r} '
                     f'files={data_config.files!r} eval_percent={data_config.eval_percent}')
  return FileSource(files)
