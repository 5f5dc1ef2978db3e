"""Labelled text sources for the encoder. Their [CLS]-first rows of token ids come from
data/tokenizers.py's Vocabulary: bytes (models/byte_vocab.py: 0..255, PAD_ID = 0, which text
never contains, then CLS, MASK and SEP) or a tokenizer.json's own ids.

Each source is an entry of data.source (`splits.SOURCES`, with the keys it reads): a grain
RandomAccessDataSource of {'inputs': bytes, 'label': int} with `num_classes`, `class_names`,
`kind = 'text'` and `record_name(index)`. csv and jsonl read a folder (train files
`{train_split}*.csv` (.jsonl) in it, test files `{test_split}*`, validation `{validation_split}*`)
or a file or glob (its records split by a hash of their text, test_percent of them for test).
The tfds entry is here too, for images (data/images.py) as for texts: which one a dataset holds
is known only once its features are read.
Labels are ints (class names '0'..max) or strings (class names sorted); other files may only use
the train files' classes. A CSV/JSONL record with bad JSON, no text or no label is dropped as the
file is loaded and counted in `source.stats` (a data.pipeline.RecordStats): the file is read
whole anyway, to split it and learn its classes, and dropping then gives an exact len(), so an
evaluation counts every example once and no batch has holes.

stdlib_packages, a download-free task: which of STDLIB_PACKAGES a snippet of its source comes
from. Snippets are non-overlapping runs of seq_len - 1 bytes (a full row after CLS) from each
package's .py files, test folders left out. A file's first snippet starts between seq_len - 1
and 2 * (seq_len - 1) bytes in, at an offset fixed by a hash of its path, so the licence and
docstring heading a file (which often name the package) are never shown. Test holds whole
files, chosen per package by a hash of their paths relative to the stdlib root (see
`stdlib_test_files`): no file is in both splits, every class is in both, and the split is the
same on any machine with the same Python. Snippets (train / test), CPython 3.11.7, seq_len 512,
test_percent 10 (validation is then carved from train):
  asyncio 805/89  concurrent 111/17  email 614/68  http 353/52  importlib 337/38
  logging 276/70  multiprocessing 434/54  unittest 413/49  urllib 282/23  xml 490/63
  (4115/523). Unbalanced: the largest class is 20% of train; report balanced accuracy too.
Learnable but not easy: one in ten snippets names its package; naive Bayes on byte pairs gets
63% of test right.

With `data.tokenizer` naming a Hugging Face tokenizer.json (BERT's WordPiece, as
`python -m tools.hf import` writes it), texts are that tokenizer's ids instead, and the
specials its [CLS], [SEP], [MASK] and [PAD] (which must be 0): `Vocabulary`. A row is then
[CLS] ids [SEP] [PAD]..., as BERT's.

Masked-language-model batches for pretraining are in data/mlm.py.
"""

import csv
import glob
import io
import json
import os
import re
import sysconfig
import zlib

import grain
import numpy as np
from absl import logging
from etils import epath

from data import images, pipeline, sources, splits
from data.choices import Key, require
from data.splits import SOURCES

STDLIB_PACKAGES = ('asyncio', 'concurrent', 'email', 'http', 'importlib', 'logging',
                   'multiprocessing', 'unittest', 'urllib', 'xml')
_TEST_FOLDERS = {'test', 'tests', 'idle_test'}  # unittest's tests moved out in 3.12: skip them all
# Known text datasets: their text feature (the split that tests: data/splits.py).
TFDS_TEXT = {'imdb_reviews': 'text', 'glue/sst2': 'sentence'}
_INT = re.compile(r'-?\d+')
TEXT_KEY = Key('text', "the field holding the text (tfds: '' or 'text' = the dataset's text)")
LABEL_KEY = Key('label', 'the field holding the label')


class TextClassificationSource(grain.sources.RandomAccessDataSource):
  """Labelled texts held in memory, each {'inputs': bytes, 'label': int}."""

  kind = 'text'

  def __init__(self, texts, labels, names, class_names, stats=None):
    self._texts, self._names = texts, names
    self._labels = np.asarray(labels, np.int32)
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.stats = stats or pipeline.RecordStats()  # records dropped when the files were read

  def __len__(self):
    return len(self._texts)

  def __getitem__(self, index):
    return {'inputs': self._texts[index], 'label': int(self._labels[index])}

  def record_name(self, index) -> str:
    return self._names[index]

  def labels(self) -> np.ndarray:
    return self._labels

  def __repr__(self):
    return f'TextClassificationSource({len(self)} texts, {self.num_classes} classes)'


class TfdsTextClassificationSource(grain.sources.RandomAccessDataSource):
  """A TFDS text dataset through `tfds.data_source` (ArrayRecord, no TensorFlow)."""

  kind = 'text'

  def __init__(self, name: str, split: str, *, data_dir='', text_key='', label_key=''):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; slow to import
    self._name, self._split = name, split
    self._source = _tfds_data_source(tfds, name, split, data_dir)
    features = self._source.dataset_info.features
    self._text_key = _text_key(tfds, name, features, text_key)
    self._label_key = label_key or 'label'
    for key, which in ((self._text_key, 'text_key'), (self._label_key, 'label_key')):
      if key not in features:
        raise ValueError(f'data.{which}: {name} has no feature {key!r}; it has {sorted(features)}')
    label = features[self._label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(f'data.label_key: {name} feature {self._label_key!r} is not a ClassLabel')
    self.class_names, self.num_classes = tuple(label.names), label.num_classes
    if len(self) and self[0]['label'] < 0:  # TFDS marks unlabelled splits with -1
      raise ValueError(f'data: split {split!r} of {name} is unlabelled (label -1); choose '
                       f'another (its splits: {sorted(self._source.dataset_info.splits)})')

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    text = record[self._text_key]
    return {'inputs': text.encode() if isinstance(text, str) else bytes(text),
            'label': int(record[self._label_key])}

  def record_name(self, index) -> str:
    return f'{self._name}[{self._split}] record {index}'


def _tfds_data_source(tfds, name, split, data_dir):
  where = data_dir or tfds.core.constants.DATA_DIR
  try:  # download=False: a missing dataset is an error here, never a download mid-run
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError,
          AssertionError):
    raise ValueError(
        f'data.name: TFDS {name!r} is not prepared as array_record in {where}; prepare it once '
        f'with `tfds build {name} --data_dir={where} --file_format=array_record` (needs the '
        'network and TensorFlow), or point data.tfds_data_dir at a copy') from None
  except ValueError as e:  # e.g. an unknown split
    raise ValueError(f'data: TFDS {name!r} split {split!r}: {str(e).splitlines()[0]}') from None


def _text_key(tfds, name, features, text_key) -> str:
  """text_key, or the dataset's text feature for '' and for 'text' (the CSV default) if absent."""
  if text_key in features or text_key not in ('', 'text'):
    return text_key
  if splits.tfds_entry(TFDS_TEXT, name):
    return splits.tfds_entry(TFDS_TEXT, name)
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
  if len(texts) != 1:
    raise ValueError(f'data.text_key: set it to one of the text features of {name}: {texts}')
  return texts[0]


def is_text_tfds(name: str, data_dir: str = '') -> bool:
  """Whether TFDS dataset `name` holds text: a known one, or one with a Text feature."""
  if splits.tfds_entry(TFDS_TEXT, name):
    return True
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    features = tfds.builder(name, data_dir=data_dir or None).info.features
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return any(isinstance(f, tfds.features.Text) for f in features.values())


def _record(text, label, name, stats):
  """(text, label) of one record, or None (counted) when it has no text or no label."""
  if isinstance(label, bool) or not isinstance(label, (int, str, type(None))):
    raise ValueError(f'data.label_key: label {label!r} at {name} is not an int or a class name')
  label = str(label).strip() if label is not None else ''
  problem = ('no text' if not isinstance(text, str) or not text.strip() else
             'no label' if not label else None)
  stats.count(problem and f'{name}: {problem}')
  if problem:
    return None
  return text.encode(), str(int(label)) if _INT.fullmatch(label) else label, name


def _check_keys(path, keys, text_key, label_key, what):
  for key, which in ((text_key, 'text_key'), (label_key, 'label_key')):
    if key not in keys:
      raise ValueError(f'data.{which}: no {what} {key!r} in {path}; found {sorted(keys)}')


def _read_csv(path, text_key, label_key, stats):
  reader = None
  try:
    text = epath.Path(path).read_bytes().decode('utf-8-sig')
    reader = csv.DictReader(io.StringIO(text, newline=''))
    _check_keys(path, reader.fieldnames or [], text_key, label_key, 'column')
    return [r for row in reader if (r := _record(
        row[text_key], row[label_key], f'{path}:{reader.line_num}', stats))]
  except OSError as e:
    raise ValueError(f'data.path: cannot read {path}: {e.strerror or e}') from None
  except UnicodeDecodeError:
    raise ValueError(f'data.path: {path} is not UTF-8 text') from None
  except csv.Error as e:
    line = reader.line_num if reader else 0
    raise ValueError(f'data.path: {path} line {line} is not CSV: {e}') from None


def _read_jsonl(path, text_key, label_key, stats):
  records, keys = [], set()
  try:
    with epath.Path(path).open('rb') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
        except ValueError as e:  # bad JSON or bad UTF-8: skip this line, keep the file
          stats.count(f'{path}:{number}: not JSON ({e})')
          continue
        if not isinstance(item, dict):
          stats.count(f'{path}:{number}: not a JSON object')
          continue
        keys.update(item)
        records.append(_record(item.get(text_key), item.get(label_key), f'{path}:{number}',
                               stats))
  except OSError as e:
    raise ValueError(f'data.path: cannot read {path}: {e.strerror or e}') from None
  if keys:  # a key that no record has is a misnamed column, not a bad record
    _check_keys(path, keys, text_key, label_key, 'record with key')
  return [r for r in records if r]


def _read_files(cfg, read, pattern, which, stats):
  paths = sources.glob_files(pattern)
  if not paths:
    raise ValueError(f'data.{which}: no file matches {pattern!r}')
  records = [r for p in paths for r in read(p, cfg.text_key or 'text', cfg.label_key or 'label',
                                            stats)]
  if stats.bad:
    logging.warning('%s: dropped %d of %d records, e.g. %s', pattern, stats.bad, stats.seen,
                    stats.examples)
  return records


def _classes(labels) -> tuple[str, ...]:
  """'0'..'max' when every label is an int, else the distinct labels sorted."""
  if labels and all(_INT.fullmatch(label) for label in labels):
    return tuple(str(i) for i in range(max(map(int, labels)) + 1))
  return tuple(sorted(set(labels)))


def _file_source(cfg, split, read):
  """The records of `split` in cfg.path's files, read by `read` (_read_csv, _read_jsonl); None
  for validation without split files of its own (a holdout is carved from train)."""
  name = splits.split_name(cfg, split)
  if name is None:
    return None
  stats = pipeline.RecordStats()
  if epath.Path(cfg.path).is_dir():
    if not (cfg.train_split and cfg.test_split):
      raise ValueError(f'data.train_split, data.test_split: name the files in {cfg.path}')
    files = lambda name: str(epath.Path(cfg.path) / f'{name}*.{cfg.source}')
    train = _read_files(cfg, read, files(cfg.train_split), 'train_split',
                        stats if split == 'train' else pipeline.RecordStats())
    class_names = _classes([label for _, label, _ in train])
    records = (train if split == 'train' else
               _read_files(cfg, read, files(name), f'{split}_split', stats))
  else:  # by text, so duplicate texts never straddle the splits
    require(split != 'validation', 'data.validation_split',
            f'{cfg.path} is not a folder of split files: auto or holdout')
    records = _read_files(cfg, read, cfg.path, 'path', stats)
    class_names = _classes([label for _, label, _ in records])
    records = [r for r in records
               if (zlib.crc32(r[0]) % 100 < cfg.test_percent) == (split == 'test')]
  if not records:
    raise ValueError(f'data: no usable {split} records in {cfg.path} ({stats.bad} dropped, '
                     f'test_percent={cfg.test_percent})')
  ids = {name: i for i, name in enumerate(class_names)}
  for _, label, name in records:
    if label not in ids:
      raise ValueError(f'data.label_key: label {label!r} at {name} is not a class of the train '
                       f'files: {list(class_names)[:10]}')
  texts, labels, names = zip(*records)
  return TextClassificationSource(list(texts), [ids[label] for label in labels], list(names),
                                  class_names, stats)


_FILE_KEYS = dict(path=splits.PATH, train_split=splits.TRAIN_SPLIT, test_split=splits.TEST_SPLIT,
                  test_percent=splits.TEST_PERCENT, text_key=TEXT_KEY, label_key=LABEL_KEY)


@SOURCES.register('csv', 'CSV files with a header row naming the text and label columns',
                  splits.gives('texts'), **_FILE_KEYS)
def _csv(d, split):
  return _file_source(d, split, _read_csv)


@SOURCES.register('jsonl', 'JSON lines, each an object with the text and label keys',
                  splits.gives('texts'), **_FILE_KEYS)
def _jsonl(d, split):
  return _file_source(d, split, _read_jsonl)


def stdlib_package_files() -> tuple[str, dict[str, list[str]]]:
  """The stdlib root and, per package, its non-test .py files ('/'-separated, sorted)."""
  root = sysconfig.get_paths()['stdlib']
  files = {}
  for package in STDLIB_PACKAGES:
    found = glob.glob(os.path.join(root, package, '**', '*.py'), recursive=True)
    relative = ('/'.join(os.path.relpath(p, root).split(os.sep)) for p in found)
    files[package] = sorted(r for r in relative if not _TEST_FOLDERS & set(r.split('/')[:-1]))
  return root, files


def _snippet_starts(data: bytes, relative: str, size: int) -> range:
  return range(size + zlib.crc32(relative.encode()) % size, len(data) - size + 1, size)


def stdlib_test_files(snippets: dict[str, int], test_percent: int) -> set[str]:
  """A package's test files, from {file: its snippet count}: in the order of a hash of their
  paths, each that brings the test count nearer to test_percent of the package's snippets (or
  the smallest useful file, when none does). test_percent < 50, so train keeps some."""
  target = sum(snippets.values()) * test_percent / 100
  held_out, total = set(), 0
  for f in sorted(snippets, key=lambda f: (zlib.crc32(f.encode()), f)):
    if abs(total + snippets[f] - target) < abs(total - target):
      held_out.add(f)
      total += snippets[f]
  return held_out or {min((n, f) for f, n in snippets.items() if n)[1]}


def stdlib_packages_source(seq_len: int, split: str, test_percent: int):
  """Snippets of STDLIB_PACKAGES' source, labelled by package (see the module docstring)."""
  size = seq_len - 1
  root, files = stdlib_package_files()
  texts, labels, names = [], [], []
  for label, package in enumerate(STDLIB_PACKAGES):
    contents = {}
    for relative in files[package]:
      with open(os.path.join(root, *relative.split('/')), 'rb') as f:
        contents[relative] = f.read().replace(b'\r\n', b'\n')  # the same bytes from Windows
    snippets = {f: len(_snippet_starts(data, f, size)) for f, data in contents.items()}
    if sum(map(bool, snippets.values())) < 2:
      raise ValueError(f'data.source=stdlib_packages: {root}/{package} has under two files long '
                       'enough to give snippets; both splits need one')
    held_out = stdlib_test_files(snippets, test_percent)
    for relative, data in contents.items():
      if (relative in held_out) == (split == 'test'):
        for start in _snippet_starts(data, relative, size):
          texts.append(data[start:start + size])
          labels.append(label)
          names.append(f'{relative}@{start}')
  return TextClassificationSource(texts, labels, names, STDLIB_PACKAGES)


def _check_stdlib_packages(d):
  require(0 <= d.test_percent < 50, 'test_percent', f'{d.test_percent} is not in [0, 50)')
  require(d.validation_split in ('auto', 'holdout'), 'validation_split',
          f'{d.validation_split!r}: stdlib_packages has no split of that name (auto or holdout)')


@SOURCES.register(
    'stdlib_packages', 'which of ten stdlib packages a snippet of its source is from (no download)',
    splits.gives('texts', _check_stdlib_packages), test_percent=splits.TEST_PERCENT)
def _stdlib_packages(d, split):
  if split == 'validation':
    return None  # always a holdout
  return stdlib_packages_source(d.seq_len, split, d.test_percent)


def _tfds_split(d, split: str) -> str | None:
  """The TFDS split read as `split` ('' train and test splits: the dataset's usual ones)."""
  if split == 'train':
    return d.train_split or 'train'
  if split == 'test':
    return splits.tfds_test_split(d)
  return splits.split_name(d, split, lambda: splits.tfds_validation_split(d))


def _check_tfds(d, **_):  # images or texts: the model takes either
  require(bool(d.name), 'name', "is empty but data.source='tfds'")


@SOURCES.register(
    'tfds', 'a TensorFlow Datasets dataset built as array_record: images, or texts',
    _check_tfds, name=Key('', "the dataset, e.g. 'mnist', 'cifar10', 'imdb_reviews', 'glue/sst2'"),
    tfds_data_dir=Key('', "where it was built; '' = TFDS_DATA_DIR or ~/tensorflow_datasets"),
    train_split=splits.TRAIN_SPLIT, test_split=splits.TEST_SPLIT, image_size=images.IMAGE_SIZE,
    text_key=TEXT_KEY, label_key=LABEL_KEY)
def _tfds(d, split):
  """A dataset with a Text feature gives texts, any other images (features image and label)."""
  name = _tfds_split(d, split)
  if name is None:
    return None
  if is_text_tfds(d.name, d.tfds_data_dir):
    return TfdsTextClassificationSource(d.name, name, data_dir=d.tfds_data_dir,
                                        text_key=d.text_key, label_key=d.label_key)
  return images.TfdsImageSource(d.name, name, d.tfds_data_dir, d.image_size)
