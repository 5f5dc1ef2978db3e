"""Classification data: IDX / TFDS / folder sources and the train and eval batches built on them.

Every dataset here is made in the test's tmp dir. Images carry their record index in two pixels
(`_index_of` reads it back), so tests can say exactly which examples a batch holds.
"""

import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import encoder_classify, fashion_mnist_cnn
from data import classification, images, splits, tokenizers
from data.pipeline import RecordStats
from training import config_check, config_doc


def _write_idx(path, array: np.ndarray):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  data = header + array.astype(np.uint8).tobytes()
  with (gzip.open if str(path).endswith('.gz') else open)(path, 'wb') as f:
    f.write(data)


def _indexed_images(n, height=12, width=10):
  """uint8 [n, height, width] noise whose pixels (0, 0) and (0, 1) hold the index."""
  array = np.random.default_rng(n).integers(0, 256, size=(n, height, width), dtype=np.uint8)
  array[:, 0, 0], array[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
  return array


def _index_of(inputs):
  """Record indices from normalize=none batch inputs [b, H, W, C] (as floats in 0..1)."""
  pixels = np.round(np.asarray(inputs)[:, 0, :2, 0] * 255).astype(int)
  return pixels[:, 0] * 256 + pixels[:, 1]


def _write_mnist_like(directory, n_train=50, n_test=21, gz=True):
  ext = '.gz' if gz else ''
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    _write_idx(directory / f'{prefix}-images-idx3-ubyte{ext}', _indexed_images(n))
    _write_idx(directory / f'{prefix}-labels-idx1-ubyte{ext}', np.arange(n) % 10)


def _config(path, **overrides):
  d = classification.default_data_config()
  d.update(dict(source='idx', path=str(path), normalize='none', global_batch_size=8,
                worker_threads=1, prefetch_batches=2))
  d.update(overrides)
  return d


def _train(d, split='train', process_index=0, process_count=1, **kwargs):
  source = classification.make_source(d, split)
  return classification.train_batches(source, d, process_index=process_index,
                                      process_count=process_count, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Sources

@pytest.mark.parametrize('gz', [True, False])
def test_idx_files_round_trip(tmp_path, gz):
  _write_mnist_like(tmp_path, gz=gz)
  source = classification.make_source(_config(tmp_path), 'test')  # test_split=test: t10k-*
  assert len(source) == 21 and source.kind == 'image' and source.num_classes == 10
  assert source.class_names == [str(i) for i in range(10)]
  item = source[13]
  np.testing.assert_array_equal(item['inputs'][..., 0], _indexed_images(21)[13])
  assert item['inputs'].shape == (12, 10, 1) and item['inputs'].dtype == np.uint8
  assert item['label'] == 3 and 't10k-images' in source.record_name(13)


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_bytes(b'\0\0\x08\x01' + p.read_bytes()[4:]), 'magic 00000801'),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), 'truncated'),
    (lambda p: p.unlink(), 'no train-images-idx3-ubyte'),
])
def test_bad_idx_file_is_a_one_line_error_naming_it(tmp_path, damage, message):
  _write_mnist_like(tmp_path, gz=False)
  damage(tmp_path / 'train-images-idx3-ubyte')
  with pytest.raises(ValueError, match=message) as error:
    classification.make_source(_config(tmp_path), 'train')
  assert 'train-images-idx3-ubyte' in str(error.value) and '\n' not in str(error.value)


def test_idx_labels_beyond_the_class_names_are_an_error(tmp_path):
  _write_mnist_like(tmp_path)
  with pytest.raises(ValueError, match='set data.class_names'):
    classification.make_source(_config(tmp_path, class_names=('a', 'b')), 'train')
  source = classification.make_source(
      _config(tmp_path, class_names=images.FASHION_MNIST_CLASSES), 'train')
  assert source.class_names[9] == 'Ankle boot'


def test_tfds_mnist_through_data_source():
  d = classification.default_data_config()
  d.update(source='tfds', name='mnist', global_batch_size=4, normalize='dataset')
  with tfds.testing.mock_data(num_examples=10):
    source = classification.make_source(d, 'train')
    batch = next(iter(classification.train_batches(source, d, process_index=0,
                                                   process_count=1)))
    validation = classification.make_source(d, 'validation')
  # TFDS mnist has no validation split: a tenth of train is held out (no label index: not by
  # class), and training never reads it.
  assert len(source) == 9 and source.class_names == [str(i) for i in range(10)]
  assert len(validation) == 1 and not set(validation.indices()) & set(source.indices())
  assert batch['inputs'].shape == (4, 28, 28, 1) and batch['inputs'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and abs(batch['inputs'].mean()) < 0.5


def test_a_tfds_validation_split_is_used_where_the_dataset_has_one(monkeypatch):
  # mock_data's datasets list no splits; a prepared one's dataset_info does.
  monkeypatch.setattr(splits, '_tfds_splits', lambda name, data_dir: frozenset(
      {'train', 'validation', 'test'}))
  d = classification.default_data_config()
  d.update(source='tfds', name='mnist', normalize='none')
  with tfds.testing.mock_data(num_examples=10):
    train, validation = (classification.make_source(d, s) for s in ('train', 'validation'))
  assert len(train) == 10 and "split='validation'" in repr(validation)  # no holdout


def test_tfds_dataset_not_prepared_says_where_and_how(tmp_path):
  d = classification.default_data_config()
  d.update(source='tfds', name='fashion_mnist', tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='not prepared') as error:
    classification.make_source(d, 'train')
  message = str(error.value)
  assert str(tmp_path) in message and 'tfds build fashion_mnist' in message
  assert '\n' not in message


def test_unknown_tfds_name_and_unknown_source_are_config_errors(tmp_path):
  d = _config(tmp_path, source='tfds', name='no_such_dataset_here')
  with pytest.raises(ValueError, match='data.name: Dataset no_such_dataset_here not found'):
    classification.make_source(d, 'train')
  with pytest.raises(ValueError, match='data.source'):
    classification.make_source(_config(tmp_path, source='parquet'), 'train')


def test_each_source_reads_its_own_keys_and_checks_them():
  """data.source is a registry: a key that only other sources read is an error when set on the
  command line, left behind when the source is switched there, and out of config.json."""
  config = fashion_mnist_cnn.get_config('tiny')
  config.data.name = 'mnist'
  with pytest.raises(config_check.ConfigError,
                     match=r"^data.name: set to 'mnist', but data.source='idx' does not read it$"):
    config_check.keep_chosen(config, {'data.name'})
  config.data.source = 'tfds'  # the file's class_names (idx's) stay behind, tolerated
  config_check.keep_chosen(config, {'data.source', 'data.name'})
  assert {'name', 'tfds_data_dir', 'image_size', 'text_key'} <= set(config.data)
  assert not {'path', 'class_names', 'image_channels', 'test_percent'} & set(config.data)
  config.data.name = ''
  with pytest.raises(config_check.ConfigError,
                     match=r"^data.name: is empty but data.source='tfds'$"):
    config_check.check_task(config)
  texts = encoder_classify.get_config('tiny')
  texts.data.source = 'folder'
  with pytest.raises(config_check.ConfigError, match=r"^data.source: 'folder' gives images, and "
                                                     r"model.name='encoder' takes texts$"):
    config_check.check_task(texts)
  printed = config_doc.print_config(texts, 'configs/encoder_classify.py:tiny').splitlines()
  assert ("data.source = 'folder'  # where the labelled examples come from: idx | cifar_bin | "
          'folder | csv | jsonl | stdlib_packages | tfds') in printed


def _write_png(path, index, size=(6, 5), mode='RGB'):
  array = np.full((size[1], size[0], 3), 200, np.uint8)
  array[0, 0], array[0, 1] = index // 256, index % 256
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).convert(mode).save(path)


def test_folder_with_split_subfolders(tmp_path):
  for split, count in (('train', 5), ('test', 2)):
    for name in ('b_dog', 'a_cat'):
      for i in range(count):
        _write_png(tmp_path / split / name / f'{i}.png', i)
  d = _config(tmp_path, source='folder')
  train, test = (classification.make_source(d, s) for s in ('train', 'test'))
  assert train.class_names == ['a_cat', 'b_dog'] and (len(train), len(test)) == (10, 4)
  item = train[7]  # sorted: a_cat 0..4, then b_dog 0..4
  assert item['label'] == 1 and item['inputs'].shape == (5, 6, 3)
  assert tuple(item['inputs'][0, 1]) == (2, 2, 2)


def test_folder_split_by_hash_is_disjoint_and_complete(tmp_path):
  for name in ('x', 'y', 'z'):
    for i in range(20):
      _write_png(tmp_path / name / f'img{i}.jpg', i)
  d = _config(tmp_path, source='folder', test_percent=30, validation_fraction=0.2)
  train, validation, test = (classification.make_source(d, s) for s in classification.SPLITS)
  names = lambda s: {s.record_name(i) for i in range(len(s))}
  assert len(validation) and len(test)
  assert not (names(train) & names(validation) or names(train) & names(test) or
              names(validation) & names(test))
  assert len(train) + len(validation) + len(test) == 60
  assert names(test) == names(classification.make_source(d, 'test'))


def test_unreadable_and_misshapen_images_are_skipped_and_counted(tmp_path):
  for i in range(12):
    _write_png(tmp_path / 'train' / ('ab'[i % 2]) / f'{i:02d}.png', i)
  (tmp_path / 'train' / 'a' / '50_broken.png').write_bytes(b'not a png')
  _write_png(tmp_path / 'train' / 'b' / '51_big.png', 51, size=(9, 9))
  (tmp_path / 'test' / 'a').mkdir(parents=True)
  stats = RecordStats()
  batches = _take(iter(_train(_config(tmp_path, source='folder', global_batch_size=7),
                              stats=stats)), 6)
  seen = set(np.concatenate([_index_of(b['inputs']) for b in batches]))
  held_out = classification.make_source(_config(tmp_path, source='folder'), 'validation')
  held_out = {int(held_out.record_name(i).split('/')[-1][:2]) for i in range(len(held_out))}
  assert seen == set(range(12)) - held_out  # the two bad files never reach a batch
  problems = ' | '.join(stats.examples)
  assert stats.bad >= 2 and '50_broken.png: UnidentifiedImageError' in problems
  assert '51_big.png: ValueError: shape (9, 9, 3), expected (5, 6, 3)' in problems
  resized = _train(_config(tmp_path, source='folder', image_size=(4, 4), image_channels=1))
  assert next(iter(resized))['inputs'].shape == (8, 4, 4, 1)


# ---------------------------------------------------------------------------------------------
# Validation

@pytest.mark.parametrize('process_count', [1, 2])
def test_validation_holdout_is_stratified_and_never_trained_on(tmp_path, process_count):
  """The holdout is a fifth of each class, chosen before the processes share the batches: the
  validation rows of all processes together are exactly it, and two epochs of training rows
  are exactly the rest, for one process or two."""
  _write_mnist_like(tmp_path, n_train=200)  # 20 of each class
  d = _config(tmp_path, validation_fraction=0.2, validation_seed=3)
  held_out = classification.make_source(d, 'validation').indices()
  assert np.array_equal(np.bincount(held_out % 10), [4] * 10)  # label = index % 10
  evaluated = [classification.eval_batches(classification.make_source(d, 'validation'), d,
                                           process_index=p, process_count=process_count)
               for p in range(process_count)]
  rows = np.concatenate([_index_of(b['inputs'])[b['mask'] > 0] for p in evaluated for b in p])
  assert sorted(rows) == sorted(held_out)
  trained = set()
  for p in range(process_count):
    batches = _take(iter(_train(d, process_index=p, process_count=process_count)), 40)
    trained |= set(np.concatenate([_index_of(b['inputs']) for b in batches]))
  assert trained == set(range(200)) - set(held_out)


def test_validation_holdout_depends_on_its_seed_only(tmp_path):
  _write_mnist_like(tmp_path, n_train=200)
  held_out = lambda **kw: set(classification.make_source(_config(tmp_path, **kw),
                                                         'validation').indices())
  assert held_out() == held_out(shuffle_seed=5, global_batch_size=4)  # as on a resume
  assert held_out() != held_out(validation_seed=1)


def test_a_named_validation_folder_is_used_as_it_is(tmp_path):
  for split, count in (('train', 4), ('val', 2), ('test', 3)):
    for name in ('a', 'b'):
      for i in range(count):
        _write_png(tmp_path / split / name / f'{i}.png', i)
  d = _config(tmp_path, source='folder')
  train, validation, test = (classification.make_source(d, s) for s in classification.SPLITS)
  assert (len(train), len(validation), len(test)) == (8, 4, 6)
  assert all('/val/' in validation.record_name(i) for i in range(4))
  d.update(validation_split='holdout', validation_fraction=0.5)
  validation = classification.make_source(d, 'validation')
  assert '/train/' in validation.record_name(0)


def test_a_holdout_too_small_for_a_split_is_a_one_line_error(tmp_path):
  _write_mnist_like(tmp_path)  # 5 of each class: a tenth of 5 rounds to none
  with pytest.raises(ValueError, match=r'^data.validation_fraction: 0.1 leaves no validation '):
    classification.make_source(_config(tmp_path), 'validation')


# ---------------------------------------------------------------------------------------------
# Train batches

def test_train_batches_deterministic_for_a_seed_and_reshuffled_each_epoch(tmp_path):
  _write_mnist_like(tmp_path, n_train=48)
  order = lambda seed: np.concatenate([_index_of(b['inputs']) for b in
                                       _take(iter(_train(_config(tmp_path, shuffle_seed=seed))),
                                             12)])
  first = order(1)
  np.testing.assert_array_equal(first, order(1))
  assert not np.array_equal(first, order(2))
  epochs = first.reshape(2, 48)  # 12 batches of 8 = two epochs of 48
  assert all(sorted(e) == list(range(48)) for e in epochs)
  assert not np.array_equal(epochs[0], epochs[1])


def test_labels_and_normalised_inputs(tmp_path):
  _write_mnist_like(tmp_path)
  batch = next(iter(_train(_config(tmp_path))))
  assert batch.keys() == {'inputs', 'label'}  # only eval batches carry a mask
  assert batch['inputs'].dtype == np.float32 and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['label'], _index_of(batch['inputs']) % 10)
  normalised = next(iter(_train(_config(tmp_path, normalize='dataset'))))['inputs']
  assert abs(normalised.mean()) < 0.2 and abs(normalised.std() - 1) < 0.2
  given = next(iter(_train(_config(tmp_path, normalize='given', mean=(0.5,), std=(0.25,)))))
  np.testing.assert_allclose(given['inputs'] * 0.25 + 0.5, batch['inputs'], atol=1e-6)


ALL = 'flip,crop,jitter,mixup,cutmix'


@pytest.mark.parametrize('augment', ['none', ALL])
def test_two_processes_rows_make_the_one_process_global_batch(tmp_path, augment):
  _write_mnist_like(tmp_path)
  d = _config(tmp_path, augment=augment, balance='reweight')
  whole = _take(iter(_train(d)), 9)
  halves = [_take(iter(_train(d, process_index=p, process_count=2)), 9) for p in range(2)]
  for step, batch in enumerate(whole):
    assert batch.keys() == halves[0][step].keys()
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))
  assert halves[0][0]['inputs'].shape == (4, 12, 10, 1)


@pytest.mark.parametrize('consumed', [0, 4, 13])
@pytest.mark.parametrize('balance', ['none', 'oversample'])
def test_restored_iterator_continues_identically(tmp_path, consumed, balance):
  _write_mnist_like(tmp_path)
  d = _config(tmp_path, augment=ALL, balance=balance, worker_threads=2)
  iterator = iter(_train(d, process_index=1, process_count=2))
  _take(iterator, consumed)
  state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint would store it
  expected = _take(iterator, 8)
  fresh = iter(_train(d, process_index=1, process_count=2))
  fresh.set_state(state)
  for got, want in zip(_take(fresh, 8), expected):
    assert got.keys() == want.keys() == {'inputs', 'label', 'label_b', 'mix'}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_batch_that_processes_cannot_share_and_unknown_augment_are_errors(tmp_path):
  _write_mnist_like(tmp_path)
  with pytest.raises(ValueError, match='data.global_batch_size: 8 does not split evenly'):
    _train(_config(tmp_path), process_count=3)
  with pytest.raises(ValueError, match='data.augment'):
    _train(_config(tmp_path, augment='flip,rotate'))


# ---------------------------------------------------------------------------------------------
# Eval batches

@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_every_example_once_with_masks(tmp_path, process_count):
  _write_mnist_like(tmp_path, n_test=21)  # 21 = 2 full batches of 8 and 5 over
  d = _config(tmp_path)
  source = classification.make_source(d, 'test')
  per_process = [classification.eval_batches(source, d, process_index=p,
                                             process_count=process_count)
                 for p in range(process_count)]
  batches = [{k: np.concatenate([p[i][k] for p in per_process]) for k in ('inputs', 'mask')}
             for i in range(len(per_process[0]))]
  assert len(batches) == 3 and all(len(p) == 3 for p in per_process)
  mask = np.concatenate([b['mask'] for b in batches])
  indices = np.concatenate([_index_of(b['inputs']) for b in batches])
  np.testing.assert_array_equal(mask, np.arange(24) < 21)
  np.testing.assert_array_equal(indices[:21], np.arange(21))
  assert not batches[-1]['inputs'][5:].any()  # padding is zeros
  assert per_process[0][0]['mask'].dtype == np.float32


def test_eval_masks_out_unreadable_images(tmp_path):
  for i in range(5):
    _write_png(tmp_path / 'test' / 'a' / f'{i}.png', i)
  (tmp_path / 'test' / 'a' / '2.png').write_bytes(b'garbage')
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  _write_png(tmp_path / 'train' / 'a' / 'only.png', 99)
  d = _config(tmp_path, source='folder', image_channels=1)
  stats = RecordStats()
  [batch] = classification.eval_batches(classification.make_source(d, 'test'), d,
                                        process_index=0, process_count=1, stats=stats)
  np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 1, 1, 0, 0, 0])
  assert stats.bad == 1 and '2.png' in stats.examples[0]


class _Texts:
  """A minimal text source: the interface data/text.py's sources have."""
  kind, num_classes, class_names = 'text', 2, ['short', 'long']

  def __init__(self, texts):
    self._texts = texts

  def __len__(self):
    return len(self._texts)

  def __getitem__(self, index):
    return {'inputs': self._texts[index], 'label': int(len(self._texts[index]) > 5)}

  def record_name(self, index):
    return f'text {index}'


def test_text_sources_become_token_ids(tmp_path):
  source = _Texts([b'abc', b'abcdefgh', b'xy', b'longer text'])
  d = _config(tmp_path, seq_len=6, global_batch_size=4)
  batch = next(iter(classification.train_batches(source, d, process_index=0, process_count=1)))
  assert batch['inputs'].shape == (4, 6) and batch['inputs'].dtype == np.int32
  for row, label in zip(batch['inputs'], batch['label']):
    original = [t for t in source._texts if np.array_equal(
        tokenizers.encode_for_classification(t, 6), row)]  # pylint: disable=protected-access
    assert len(original) == 1 and label == int(len(original[0]) > 5)
  [evaluation] = classification.eval_batches(source, d, process_index=0, process_count=2)
  assert evaluation['inputs'].shape == (2, 6) and evaluation['mask'].tolist() == [1, 1]
