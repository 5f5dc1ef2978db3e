"""Text data for the encoder: classification sources, [CLS_ID] rows, masked-LM batches."""

import csv
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import mlm, pipeline, sources, text, tokenizers
from data.splits import SOURCES
from models import byte_vocab


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      source='csv', name='', tfds_data_dir='', path='', train_split='', test_split='',
      validation_split='auto', test_percent=30, text_key='text', label_key='label', seq_len=64))
  cfg.update(overrides)
  return cfg


def _split(cfg, split):
  """The examples of `split` as the chosen source's entry builds them (no holdout carved)."""
  return SOURCES[cfg.source].build(cfg, split)


def test_token_ids_are_the_documented_ones():
  """Bytes are themselves, byte 0 pads, the specials follow the bytes (models/byte_vocab.py)."""
  v = byte_vocab
  assert (v.PAD_ID, v.CLS_ID, v.MASK_ID, v.SEP_ID, v.VOCAB_SIZE) == (0, 256, 257, 258, 264)


def test_encode_for_classification():
  row = tokenizers.encode_for_classification(b'hi!', 6)
  assert row.dtype == np.int32 and row.tolist() == [byte_vocab.CLS_ID, 104, 105, 33, 0, 0]
  assert (tokenizers.encode_for_classification(b'abcdefgh', 4).tolist() ==
          [byte_vocab.CLS_ID, 97, 98, 99])


def _write_csv(path, rows, header=('text', 'label')):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _reviews(n=60):
  moods = ['pos', 'neg', 'meh']
  return [(f'review {i}, "quoted", caf\u00e9 #{i}', moods[i % 3]) for i in range(n)]


def test_csv_string_labels_become_sorted_classes_split_by_text_hash(tmp_path):
  rows = _reviews()
  cfg = _cfg(path=_write_csv(tmp_path / 'reviews.csv', rows))
  train, evaluation = (_split(cfg, split) for split in ('train', 'test'))
  assert train.class_names == evaluation.class_names == ('meh', 'neg', 'pos')
  assert train.kind == 'text' and train.num_classes == 3
  got = {s[i]['inputs'].decode(): s.class_names[s[i]['label']]
         for s in (train, evaluation) for i in range(len(s))}
  assert got == dict(rows) and len(train) + len(evaluation) == len(rows)
  assert 5 < len(evaluation) < 35  # about 30% of 60
  assert evaluation.record_name(0).startswith(cfg.path + ':')


def test_csv_int_labels_are_class_ids(tmp_path):
  cfg = _cfg(path=_write_csv(tmp_path / 'a.csv', [('x', '2'), ('y', '0'), ('z', '02')]),
             test_percent=0)
  source = _split(cfg, 'train')
  assert source.class_names == ('0', '1', '2')
  assert sorted(source[i]['label'] for i in range(3)) == [0, 2, 2]


def test_csv_missing_column_names_the_columns_found(tmp_path):
  cfg = _cfg(path=_write_csv(tmp_path / 'a.csv', [('x', 'y')], header=('body', 'label')))
  with pytest.raises(ValueError, match=r"data.text_key: no column 'text' in .*a.csv; "
                                       r"found \['body', 'label'\]"):
    _split(cfg, 'train')


@pytest.mark.parametrize('problem,match', [('missing', 'no file matches'),
                                           ('latin1', 'is not UTF-8 text')])
def test_unreadable_files_are_one_line_errors(tmp_path, problem, match):
  path = tmp_path / 'data.csv'
  if problem == 'latin1':
    path.write_bytes('text,label\ncaf\xe9,1\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=match) as error:
    _split(_cfg(path=str(path)), 'train')
  assert '\n' not in str(error.value)


def _write_jsonl(path, lines):
  path.write_text('\n'.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n')
  return str(path)


def test_jsonl_bad_lines_are_dropped_and_counted(tmp_path):
  good = [{'text': f'line {i}', 'label': i % 2} for i in range(10)]
  bad = ['{"text": "cut off', {'text': '', 'label': 1}, '[1, 2]', {'text': 'no label'}]
  cfg = _cfg(source='jsonl', path=_write_jsonl(tmp_path / 'a.jsonl', good + bad),
             test_percent=0)
  source = _split(cfg, 'train')
  assert len(source) == 10 and source.class_names == ('0', '1')
  assert {source[i]['inputs'] for i in range(10)} == {f'line {i}'.encode() for i in range(10)}
  assert source.stats.bad == 4 and source.stats.seen == 14
  assert 'a.jsonl:11: not JSON' in source.stats.examples[0]


@pytest.mark.parametrize('record,match', [
    ({'body': 'x', 'label': 1}, r"data.text_key: no record with key 'text' in .*found \['body'"),
    ({'text': 'x', 'label': 1.5}, r'label 1.5 at .*a.jsonl:1 is not an int or a class name'),
])
def test_jsonl_bad_input_is_a_one_line_error(tmp_path, record, match):
  cfg = _cfg(source='jsonl', path=_write_jsonl(tmp_path / 'a.jsonl', [record]))
  with pytest.raises(ValueError, match=match):
    _split(cfg, 'train')


def test_a_folder_holds_separate_train_and_test_files(tmp_path):
  _write_csv(tmp_path / 'train-0.csv', [('a', 'pos'), ('b', 'neg')])
  _write_csv(tmp_path / 'train-1.csv', [('c', 'pos')])
  _write_csv(tmp_path / 'test.csv', [('d', 'pos')])
  _write_csv(tmp_path / 'other.csv', [('e', 'sarcastic')])
  cfg = _cfg(path=str(tmp_path), train_split='train', test_split='test')
  train, evaluation = (_split(cfg, split) for split in ('train', 'test'))
  assert len(train) == 3 and train.record_name(2).endswith('train-1.csv:2')
  assert evaluation.class_names == ('neg', 'pos')
  assert evaluation[0] == {'inputs': b'd', 'label': 1}
  cfg.test_split = 'other'
  with pytest.raises(ValueError, match="label 'sarcastic' at .*other.csv:2 is not a class"):
    _split(cfg, 'test')


def test_tfds_imdb_reviews_through_mock_data():
  assert text.is_text_tfds('imdb_reviews') and text.is_text_tfds('glue/sst2')
  assert not text.is_text_tfds('mnist')
  cfg = _cfg(source='tfds', name='imdb_reviews', text_key='', label_key='')
  with tfds.testing.mock_data(num_examples=5):
    source = _split(cfg, 'test')
    item = source[3]
  assert len(source) == 5 and source.class_names == ('neg', 'pos') and source.kind == 'text'
  assert isinstance(item['inputs'], bytes) and item['label'] in (0, 1)
  assert source.record_name(3) == 'imdb_reviews[test] record 3'


def test_unprepared_tfds_dataset_says_where_podium_looked(tmp_path):
  cfg = _cfg(source='tfds', name='imdb_reviews', tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=f'not prepared .* in {tmp_path}; .*tfds build'):
    _split(cfg, 'train')


@pytest.fixture(scope='module')
def stdlib_splits():
  cfg = _cfg(source='stdlib_packages', seq_len=512, test_percent=10)
  return [_split(cfg, split) for split in ('train', 'test')]


def test_stdlib_packages_split_files_and_classes(stdlib_splits):
  train, evaluation = stdlib_splits
  files = [{s.record_name(i).split('@')[0] for i in range(len(s))} for s in stdlib_splits]
  assert not files[0] & files[1]
  for source in stdlib_splits:
    assert source.class_names == text.STDLIB_PACKAGES and min(np.bincount(source.labels())) > 0
    assert {len(source[i]['inputs']) for i in range(len(source))} == {511}
    assert all(int(source.record_name(i).split('@')[1]) >= 511 for i in range(len(source)))
  assert 0.05 < len(evaluation) / (len(train) + len(evaluation)) < 0.2


def test_stdlib_packages_are_deterministic(stdlib_splits):
  again = _split(_cfg(source='stdlib_packages', seq_len=512, test_percent=10),
                                'test')
  first = stdlib_splits[1]
  assert [first.record_name(i) for i in range(len(first))] == [
      again.record_name(i) for i in range(len(again))]
  counts = {'a/x.py': 3, 'a/y.py': 40, 'a/z.py': 5, 'a/w.py': 0}
  held_out = text.stdlib_test_files(counts, 10)
  assert held_out == text.stdlib_test_files(dict(reversed(counts.items())), 10)
  assert held_out and held_out != set(counts)


# Masked-LM batches.


def _documents(tmp_path, n=200, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(n):
    body = bytes(rng.integers(97, 123, rng.integers(20, 300)).astype(np.uint8))
    (tmp_path / f'doc{i:02d}.txt').write_bytes(f'<{i}>'.encode() + body)
  return sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))


def _mlm(source, **overrides):
  kwargs = dict(seq_len=32, global_batch_size=8, seed=0, shuffle=True, shuffle_window=256)
  kwargs.update(overrides)
  return mlm.mlm_batches(source, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _original(batch):
  """The unmasked rows: targets where weighted, else inputs."""
  return np.where(batch['weights'] > 0, batch['targets'], batch['inputs'])


def test_masking_follows_bert(tmp_path):
  source = _documents(tmp_path)
  batches = _take(iter(_mlm(source, global_batch_size=64, seq_len=64)), 8)
  inputs, targets, weights = (np.concatenate([b[k] for b in batches])
                              for k in ('inputs', 'targets', 'weights'))
  assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
  original = _original({'inputs': inputs, 'targets': targets, 'weights': weights})
  real = (original != byte_vocab.PAD_ID) & (original != byte_vocab.CLS_ID)
  masked = weights > 0
  assert (original[:, 0] == byte_vocab.CLS_ID).all() and not masked[~real].any()
  assert abs(masked.sum() / real.sum() - 0.15) < 0.01
  assert (targets[masked] == original[masked]).all() and (targets[~masked] == 0).all()
  mask_token = inputs[masked] == byte_vocab.MASK_ID
  unchanged = inputs[masked] == original[masked]
  assert abs(mask_token.mean() - 0.8) < 0.03 and abs(unchanged.mean() - 0.1) < 0.02
  replaced = inputs[masked][~mask_token & ~unchanged]
  assert abs(len(replaced) / masked.sum() - 0.1) < 0.02
  assert ((replaced >= 1) & (replaced < 256)).all()  # a byte, never PAD or a special id
  corpus = b''.join(source[i] for i in range(len(source)))
  for row in original[:20]:
    assert bytes(row[1:][row[1:] != 0].astype(np.uint8)) in corpus


def test_every_piece_of_every_usable_document_once_per_epoch(tmp_path):
  source = _documents(tmp_path, n=5)
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  with_bad = sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))
  stats = pipeline.RecordStats()
  pieces = sum(-(-len(source[i]) // 31) for i in range(len(source)))
  ds = _mlm(with_bad, global_batch_size=1, shuffle=False, stats=stats, prefetch_batches=0)
  # One row more than an epoch: the next epoch's first row comes only after the bad files
  # (sorted after the documents) were read, however far the pipeline read ahead.
  rows = [_original(b)[0] for b in _take(iter(ds), pieces + 1)]
  assert b''.join(bytes(r[1:][r[1:] != 0].astype(np.uint8)) for r in rows[:pieces]) == b''.join(
      source[i] for i in range(len(source)))
  problems = ' | '.join(stats.examples)  # read-ahead may count them again, in the next epoch
  assert stats.bad >= 2 and 'empty.txt: empty' in problems and 'latin1.txt: invalid' in problems


def test_documents_are_reshuffled_each_epoch(tmp_path):
  source = _documents(tmp_path, n=12)
  ds = _mlm(source, seq_len=400, global_batch_size=12, shuffle_window=1)
  order = [[int(bytes(r[2:5].astype(np.uint8)).split(b'>')[0]) for r in _original(b)]
           for b in _take(iter(ds), 3)]
  assert all(sorted(o) == list(range(12)) for o in order)
  assert order[0] != order[1] != order[2]


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
  source = _documents(tmp_path)
  first, again, other = (_take(iter(_mlm(source, seed=s)), 4) for s in (1, 1, 2))
  for key in ('inputs', 'targets', 'weights'):
    np.testing.assert_array_equal([b[key] for b in first], [b[key] for b in again])
  assert not np.array_equal([b['inputs'] for b in first], [b['inputs'] for b in other])


@pytest.mark.parametrize('consumed', [0, 7])
def test_restored_iterator_continues_identically(tmp_path, consumed):
  source = _documents(tmp_path)
  iterator = iter(_mlm(source))
  _take(iterator, consumed)
  state = iterator.get_state()
  expected = _take(iterator, 5)
  fresh = iter(_mlm(source))
  fresh.set_state(state)
  for got, want in zip(_take(fresh, 5), expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_two_processes_rows_make_the_one_process_batch(tmp_path):
  source = _documents(tmp_path)
  whole = _take(iter(_mlm(source)), 4)
  halves = [_take(iter(_mlm(source, process_index=p, process_count=2)), 4) for p in (0, 1)]
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def _letter_documents(tmp_path, lengths):
  """Document i is letter i repeated: any piece of it says which document it came from."""
  for i, length in enumerate(lengths):
    (tmp_path / f'doc{i}.txt').write_bytes(bytes([97 + i]) * length)
  return sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))


def _documents_of(batch):
  return [set(row[1:][row[1:] != 0].tolist()) for row in _original(batch)]


def test_eval_batches_are_fixed_and_split_over_processes(tmp_path):
  source = _documents(tmp_path)
  make = lambda **kw: mlm.mlm_eval_batches(
      source, seq_len=32, global_batch_size=4, num_batches=3, seed=3, **kw)
  first, again = make(), make()
  halves = [make(process_index=p, process_count=2) for p in (0, 1)]
  for step in range(3):
    for key in ('inputs', 'targets', 'weights', 'mask'):
      np.testing.assert_array_equal(first[step][key], again[step][key])
      np.testing.assert_array_equal(
          first[step][key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_eval_batches_spread_over_documents_and_pad_when_they_run_out(tmp_path):
  source = _letter_documents(tmp_path, [100, 200, 300, 100, 200, 300])
  spread = mlm.mlm_eval_batches(source, seq_len=32, global_batch_size=6, num_batches=1, seed=0)
  assert sorted(min(d) for d in _documents_of(spread[0])) == list(range(97, 103))
  few = mlm.mlm_eval_batches(source, seq_len=400, global_batch_size=4, num_batches=2, seed=0)
  assert [b['mask'].tolist() for b in few] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert (few[1]['inputs'][2:] == 0).all() and not few[1]['weights'][2:].any()
  assert few[1]['weights'][:2].sum(axis=1).min() >= 15
