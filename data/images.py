"""Image-classification sources: IDX files (the MNIST family), the CIFAR-10 binary files and
folders of images, each an entry of data.source (`splits.SOURCES`), and TFDS images (its tfds
entry is in data/text.py: a TFDS dataset holds images or texts).

Each is a random-access source of {'inputs': uint8 [H, W, C], 'label': int} with `num_classes`,
`class_names`, `kind` ('image') and `record_name(index)`; `data/classification.py` does the rest.
"""

import gzip
import io
import struct
import zlib

import grain
import numpy as np
from etils import epath

from data import splits
from data.choices import Key, require
from data.splits import SOURCES

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CLASS_NAMES = Key((), "names for labels 0..; () = '0'..'9' (cifar_bin: its batches.meta.txt)")
IMAGE_SIZE = Key((), "(H, W): resize the images to it; () = keep (folder: the first's size)")


def resize(image: np.ndarray, size) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size[0], size[1], C] (bilinear); unchanged if already that size."""
  if not size or image.shape[:2] == tuple(size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top; only image sources need it
  squeezed = image[..., 0] if image.shape[-1] == 1 else image  # PIL wants [H, W] for grey
  resized = np.asarray(Image.fromarray(squeezed).resize(
      (size[1], size[0]), Image.Resampling.BILINEAR))
  return resized.reshape(*size, image.shape[-1])


# ---------------------------------------------------------------------------------------------
# IDX files

def read_idx(path: str, ndim: int) -> np.ndarray:
  """An IDX file of unsigned bytes with `ndim` dimensions (gzipped if it ends in .gz)."""
  try:
    data = epath.Path(path).read_bytes()
    if path.endswith('.gz'):
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f'{path}: cannot read it ({type(e).__name__}: {e})') from None
  header = 4 + 4 * ndim
  expected_magic = bytes([0, 0, 0x08, ndim])  # 0x08: unsigned bytes
  if data[:4] != expected_magic:
    raise ValueError(f'{path}: not an IDX file of {ndim}-d unsigned bytes (magic '
                     f'{data[:4].hex()}, expected {expected_magic.hex()})')
  shape = struct.unpack(f'>{ndim}I', data[4:header]) if len(data) >= header else ()
  if len(data) != header + int(np.prod(shape)) or not shape:
    raise ValueError(f'{path}: {len(data)} bytes, but its header says shape {shape} '
                     f'({header + int(np.prod(shape))} bytes); the file is truncated or corrupt')
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(directory: str, prefix: str, what: str, ndim: int) -> str:
  """The path of e.g. `train-images-idx3-ubyte`, plain or .gz, with '-' or '.' before 'idx'."""
  for sep in ('-', '.'):
    for ext in ('', '.gz'):
      path = epath.Path(directory) / f'{prefix}-{what}{sep}idx{ndim}-ubyte{ext}'
      if path.exists():
        return str(path)
  raise ValueError(f'data.path: no {prefix}-{what}-idx{ndim}-ubyte[.gz] in {directory}')


class IdxSource(grain.sources.RandomAccessDataSource):
  """Images and labels of one IDX pair, held in memory (60k MNIST images are 47 MB)."""

  kind = 'image'

  def __init__(self, images_path: str, labels_path: str, class_names=()):
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
      raise ValueError(f'{labels_path}: {len(labels)} labels for {len(images)} images in '
                       f'{images_path}')
    self.class_names = list(class_names) or [str(i) for i in range(10)]
    self.num_classes = len(self.class_names)
    if len(labels) and labels.max() >= self.num_classes:
      raise ValueError(f'{labels_path}: label {labels.max()} with only {self.num_classes} '
                       'classes; set data.class_names')
    self._images, self._labels, self._path = images[..., None], labels, images_path

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    return {'inputs': self._images[index], 'label': int(self._labels[index])}

  def record_name(self, index) -> str:
    return f'{self._path} image {index}'

  def labels(self) -> np.ndarray:
    return self._labels

  def __repr__(self):
    return f'IdxSource({self._path}, {len(self)} images)'


def idx_source(directory: str, split: str, class_names=()) -> IdxSource:
  """The MNIST-family files of `split` in `directory`; 'test' reads the `t10k-` files."""
  prefix = 't10k' if split == 'test' else split
  return IdxSource(find_idx(directory, prefix, 'images', 3),
                   find_idx(directory, prefix, 'labels', 1), class_names)


@SOURCES.register(
    'idx', 'IDX files, the MNIST family: <split>-images-idx3-ubyte[.gz] and its labels',
    splits.gives('images'), path=splits.PATH, train_split=splits.TRAIN_SPLIT,
    test_split=splits.TEST_SPLIT, class_names=CLASS_NAMES)
def _idx(d, split):
  name = splits.split_name(d, split)
  return None if name is None else idx_source(d.path, name, d.class_names)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary files

CIFAR_TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
CIFAR_TEST_FILES = ('test_batch.bin',)
_CIFAR_RECORD = 1 + 32 * 32 * 3  # a label byte, then 1024 red, 1024 green, 1024 blue pixels


def read_cifar_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 32, 32, 3], uint8 labels [N]) of one file of fixed-size records."""
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise ValueError(f'data.path: cannot read {path} ({type(e).__name__}: {e})') from None
  if not data or len(data) % _CIFAR_RECORD:
    raise ValueError(f'data.path: {path} has {len(data)} bytes, not a whole number of '
                     f'{_CIFAR_RECORD}-byte CIFAR-10 records; the file is truncated or not '
                     'from cifar-10-binary.tar.gz')
  records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major -> HWC
  return np.ascontiguousarray(images), records[:, 0].copy()


class CifarBinSource(grain.sources.RandomAccessDataSource):
  """The CIFAR-10 binary distribution (`cifar-10-batches-bin`), held in memory (the 50k
  training images are 150 MB). Never the pickled Python version: unpickling a downloaded file
  can run any code."""

  kind = 'image'

  def __init__(self, directory: str, split: str, class_names=()):
    root = epath.Path(directory)
    if (root / 'cifar-10-batches-bin').is_dir():  # the folder the archive unpacks into
      root = root / 'cifar-10-batches-bin'
    if split not in ('train', 'test'):
      raise ValueError(f'data.train_split/test_split: {split!r}; the CIFAR-10 binary files '
                       'have train (data_batch_1..5.bin) and test (test_batch.bin)')
    names = CIFAR_TRAIN_FILES if split == 'train' else CIFAR_TEST_FILES
    missing = [n for n in names if not (root / n).exists()]
    if missing:
      raise ValueError(f'data.path: no {", ".join(missing)} in {root}; unpack '
                       'cifar-10-binary.tar.gz (the binary version) and point data.path at it')
    images, labels = zip(*(read_cifar_bin(str(root / n)) for n in names))
    self._images, self._labels = np.concatenate(images), np.concatenate(labels)
    self._ends = np.cumsum([len(l) for l in labels])  # one past each file's last record
    self.class_names = list(class_names) or _cifar_class_names(root)
    self.num_classes = len(self.class_names)
    if self._labels.max() >= self.num_classes:
      raise ValueError(f'data.path: label {self._labels.max()} in {root} with only '
                       f'{self.num_classes} classes; set data.class_names')
    self._root, self._names = root, names

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    return {'inputs': self._images[index], 'label': int(self._labels[index])}

  def record_name(self, index) -> str:
    file = int(np.searchsorted(self._ends, index, side='right'))
    first = self._ends[file - 1] if file else 0
    return f'{self._root / self._names[file]} record {index - first}'

  def labels(self) -> np.ndarray:
    return self._labels

  def __repr__(self):
    return f'CifarBinSource({self._root}, {self._names[0]}.., {len(self)} images)'


@SOURCES.register(
    'cifar_bin', "CIFAR-10's binary files (cifar-10-batches-bin/): train and test",
    splits.gives('images'), path=splits.PATH, train_split=splits.TRAIN_SPLIT,
    test_split=splits.TEST_SPLIT, class_names=CLASS_NAMES)
def _cifar_bin(d, split):
  name = splits.split_name(d, split)
  return None if name is None else CifarBinSource(d.path, name, d.class_names)


def _cifar_class_names(root: epath.Path) -> list[str]:
  """The lines of `batches.meta.txt` (airplane .. truck), or '0'..'9' without it."""
  meta = root / 'batches.meta.txt'
  names = [line.strip() for line in meta.read_text().splitlines()] if meta.exists() else []
  return [n for n in names if n] or [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------------
# TFDS

class TfdsImageSource(grain.sources.RandomAccessDataSource):
  """Features 'image' and 'label' of a prepared TFDS dataset (ArrayRecord; no TensorFlow)."""

  kind = 'image'

  def __init__(self, name: str, split: str, data_dir: str = '', image_size=()):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; slow to import
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'data.name: {e.args[0].splitlines()[0]}') from None
    except Exception as e:  # pylint: disable=broad-except; TFDS's own messages mislead here
      raise _not_prepared(tfds.builder(name, data_dir=data_dir or None), split, e) from None
    label = self._source.dataset_info.features['label']
    self.class_names, self.num_classes = list(label.names), label.num_classes
    shape = self._source.dataset_info.features['image'].shape
    if None in shape[:2] and not image_size:
      raise ValueError(f'data.image_size: {name} images vary in size; set data.image_size=(H, W)')
    self._image_size = tuple(image_size)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    return {'inputs': resize(record['image'], self._image_size), 'label': int(record['label'])}

  def record_name(self, index) -> str:
    return f'{self._source} record {index}'

  def __repr__(self):
    return f'TfdsImageSource({self._source})'


def _not_prepared(builder, split, error) -> ValueError:
  root = builder._data_dir_root  # pylint: disable=protected-access; where TFDS looked
  name = builder.name
  if builder.is_prepared():  # e.g. an unknown split, or TFRecord files (no random access)
    hint = (f'; rebuild it with `tfds build {name} --file_format=array_record`'
            if isinstance(error, NotImplementedError) else '')
    return ValueError(f'data: TFDS {name} in {root}, split {split!r}: '
                      f'{str(error).splitlines()[0]}{hint}')
  return ValueError(
      f'data.name: TFDS dataset {name} is not prepared in {root} (data.tfds_data_dir); run '
      f'`tfds build {name} --file_format=array_record --data_dir=DIR` on a machine with '
      'internet and copy DIR here, or point data.tfds_data_dir at a prepared copy')


# ---------------------------------------------------------------------------------------------
# Folders of images

class FolderSource(grain.sources.RandomAccessDataSource):
  """Image files with their labels, decoded by PIL when read.

  Every image comes out with one shape: `image_size` if given (resized), else the first
  readable image's; an image that cannot be decoded or has another shape raises when read, and
  the pipeline counts it as a bad record (checking every file at startup would mean decoding a
  whole ImageNet before the first step).
  """

  kind = 'image'

  def __init__(self, files, labels, class_names, image_size=(), channels: int = 3):
    self._files, self._labels = list(files), list(labels)
    self.class_names, self.num_classes = list(class_names), len(class_names)
    self._mode, self._size = 'L' if channels == 1 else 'RGB', tuple(image_size)
    self._shape = self._first_shape()

  def _decode(self, index) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top; only this source needs it
    with Image.open(io.BytesIO(epath.Path(self._files[index]).read_bytes())) as image:
      array = np.asarray(image.convert(self._mode))
    return resize(array.reshape(*array.shape[:2], -1), self._size)

  def _first_shape(self):
    for index in range(len(self._files)):
      try:
        return self._decode(index).shape
      except Exception:  # pylint: disable=broad-except; the pipeline will count it
        continue
    raise ValueError(f'data.path: none of the {len(self._files)} images can be decoded')

  def __len__(self):
    return len(self._files)

  def __getitem__(self, index):
    image = self._decode(index)
    if image.shape != self._shape:
      raise ValueError(f'shape {image.shape}, expected {self._shape} (set data.image_size '
                       'to resize)')
    return {'inputs': image, 'label': self._labels[index]}

  def record_name(self, index) -> str:
    return self._files[index]

  def labels(self) -> list[int]:
    return self._labels

  def __repr__(self):
    return f'FolderSource({len(self)} images, {self.num_classes} classes)'


def _images_by_class(root: str, class_names) -> tuple[list[str], list[int]]:
  files, labels = [], []
  for label, name in enumerate(class_names):
    directory = epath.Path(root) / name
    if not directory.is_dir():  # a class with no examples in this split
      continue
    found = sorted(p.name for p in directory.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    files += [str(directory / f) for f in found]
    labels += [label] * len(found)
  return files, labels


def _subfolders(root: str) -> list[str]:
  return sorted(p.name for p in epath.Path(root).iterdir()
                if not p.name.startswith('.') and p.is_dir())


def folder_source(root: str, split: str, *, split_names: dict, test_percent: int, image_size=(),
                  channels: int = 3) -> FolderSource:
  """`root/<split_names[split]>/<class>/*` if the train and test folders exist, else
  `root/<class>/*` split by a hash of `<class>/<file>` (`test_percent` of them for test; the
  caller carves validation from train).

  Classes are the training folder's subfolders, sorted by name.
  """
  if not epath.Path(root).is_dir():
    raise ValueError(f'data.path: {root!r} is not a folder')
  split_folders = all((epath.Path(root) / split_names[s]).is_dir() for s in ('train', 'test'))
  class_root = str(epath.Path(root) / split_names['train']) if split_folders else root
  class_names = _subfolders(class_root)
  if not class_names:
    raise ValueError(f'data.path: no class subfolders in {class_root}')
  if split_folders or split == 'validation':
    split_root = str(epath.Path(root) / split_names[split])
    if not epath.Path(split_root).is_dir():
      raise ValueError(f'data.validation_split: no folder {split_root}')
    unknown = sorted(set(_subfolders(split_root)) - set(class_names))
    if unknown:
      raise ValueError(f'data.path: {split_root} has classes {unknown} that '
                       f'{class_root} lacks')
    files, labels = _images_by_class(split_root, class_names)
  else:
    files, labels = _images_by_class(root, class_names)
    keep = [_is_test(str(epath.Path(f).relative_to(root)), test_percent) == (split == 'test')
            for f in files]
    files = [f for f, k in zip(files, keep) if k]
    labels = [l for l, k in zip(labels, keep) if k]
  if not files:
    raise ValueError(f'data.path: no {split} images ({"/".join(IMAGE_EXTENSIONS)}) under {root}')
  return FolderSource(files, labels, class_names, image_size, channels)


def _is_test(relative_path: str, test_percent: int) -> bool:
  return zlib.crc32(relative_path.encode()) % 100 < test_percent


def _validation_folder(d) -> str:
  """A folder's own validation split: val/ or validation/ beside the train folder."""
  return next((n for n in ('val', 'validation') if (epath.Path(d.path) / n).is_dir()
               and (epath.Path(d.path) / d.train_split).is_dir()), '')


def _check_channels(d):
  require(d.image_channels in (1, 3), 'image_channels',
          f'{d.image_channels}; must be 1 (grey) or 3 (RGB)')


@SOURCES.register(
    'folder', 'a folder per class, in train/, test/ (and val/) folders or hashed into them',
    splits.gives('images', _check_channels), path=splits.PATH, train_split=splits.TRAIN_SPLIT,
    test_split=splits.TEST_SPLIT, test_percent=splits.TEST_PERCENT, image_size=IMAGE_SIZE,
    image_channels=Key(3, '1 (grey) or 3 (RGB)'))
def _folder(d, split):
  name = splits.split_name(d, split, lambda: _validation_folder(d))
  if name is None:
    return None
  names = {'train': d.train_split, 'test': d.test_split, split: name}
  return folder_source(d.path, split, split_names=names, test_percent=d.test_percent,
                       image_size=d.image_size, channels=d.image_channels)
