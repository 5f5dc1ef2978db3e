"""The input pipeline: deterministic for a seed, resumable from its saved state, sharded."""

import json
import os
import zlib

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from data import pipeline, sources
from training import checkpointing, config_check


def _write_corpus(tmp_path, n=40):
  rng = np.random.default_rng(0)
  for i in range(n):
    words = rng.choice(['alpha', 'beta', 'gamma', 'delta'], size=rng.integers(5, 60))
    (tmp_path / f'doc{i:02d}.txt').write_text(f'{i} ' + ' '.join(words))
  return sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))


def _take(iterator, n):
  return [next(iterator)['tokens'] for _ in range(n)]


def _batches(source, seed=0, batch_size=4, **kwargs):
  return pipeline.batches(source, seq_len=16, batch_size=batch_size, seed=seed, shuffle=True,
                          **kwargs)


def test_batches_have_shape_and_carry_the_text(tmp_path):
  batch = next(iter(_batches(_write_corpus(tmp_path))))['tokens']
  assert batch.shape == (4, 17) and batch.dtype == np.int32
  text = bytes(batch.astype(np.uint8).ravel()).replace(b'\0', b'')
  assert set(text) <= set(b'0123456789 alphbetgmd')


def test_pipeline_times_its_batches_and_keeps_its_state(tmp_path):
  source, stats = _write_corpus(tmp_path), pipeline.RecordStats()
  iterator = iter(_batches(source, stats=stats, prefetch_batches=0))
  next(iterator)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  assert stats.batches == 4 and stats.batch_seconds > 0  # data/pipeline_tokens_per_second
  restored = iter(_batches(source, prefetch_batches=0))
  restored.set_state(state)  # the timing adds nothing to the state
  np.testing.assert_array_equal(_take(restored, 3), expected)


def test_rows_number_their_documents_and_positions(tmp_path):
  """Unshuffled, the rows are the documents end to end, each closed by the separator, cut every
  seq_len + 1 tokens. A document cut by a row's end goes on in the next row as segment 1, at
  position 0 again."""
  lengths = [5, 30, 3, 12, 20, 7]
  for i, n in enumerate(lengths):
    (tmp_path / f'doc{i}.txt').write_text(chr(ord('a') + i) * n)
  source = sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))
  batches = iter(pipeline.batches(source, seq_len=16, batch_size=2, seed=0, shuffle=False))
  keys = ('tokens', 'segment_ids', 'positions')
  rows = [row for _ in range(6) for row in zip(*map(next(batches).get, keys))]
  stream = b''.join(chr(ord('a') + i).encode() * n + b'\0' for i, n in enumerate(lengths)) * 3
  doc_of_token = np.cumsum([0] + [t == 0 for t in stream[:-1]])  # which document, in order
  split_rows = 0
  for r, (tokens, segment_ids, positions) in enumerate(rows):
    docs = doc_of_token[r * 17:(r + 1) * 17]
    starts = np.concatenate([[True], docs[1:] != docs[:-1]])
    np.testing.assert_array_equal(tokens, np.frombuffer(stream[r * 17:(r + 1) * 17], np.uint8))
    np.testing.assert_array_equal(segment_ids, np.cumsum(starts))
    first = np.maximum.accumulate(np.where(starts, np.arange(17), 0))
    np.testing.assert_array_equal(positions, np.arange(17) - first)
    split_rows += r > 0 and docs[0] == doc_of_token[r * 17 - 1]  # began in the row before
  assert split_rows >= 3


def test_same_seed_same_order_other_seed_other_order(tmp_path):
  source = _write_corpus(tmp_path)
  first = _take(iter(_batches(source, seed=1)), 5)
  again = _take(iter(_batches(source, seed=1)), 5)
  other = _take(iter(_batches(source, seed=2)), 5)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


@pytest.mark.parametrize('consumed', [0, 3, 11])
def test_restored_iterator_continues_identically(tmp_path, consumed):
  source = _write_corpus(tmp_path)
  iterator = iter(_batches(source))
  _take(iterator, consumed)
  saved = iterator.get_state()
  expected = [next(iterator) for _ in range(6)]
  fresh = iter(_batches(source))
  fresh.set_state(saved)
  for batch in expected:  # tokens, segment ids and positions alike
    chex.assert_trees_all_equal(next(fresh), batch)


def test_epochs_reshuffle_and_cover_every_document(tmp_path):
  source = _write_corpus(tmp_path, n=6)
  docs = pipeline.batches(source, seq_len=1, batch_size=1, seed=0, shuffle=True)
  text = bytes(np.concatenate(_take(iter(docs), 2000)).astype(np.uint8).ravel())
  assert all(f'{i} '.encode() in text for i in range(6))


def test_streams_read_disjoint_documents(tmp_path):
  source = _write_corpus(tmp_path, n=10)
  seen = []
  for stream in range(2):
    ds = pipeline.batches(source, seq_len=4000, batch_size=1, seed=0, shuffle=False,
                          streams=(stream,), num_streams=2)
    text = bytes(next(iter(ds))['tokens'].astype(np.uint8).ravel())
    seen.append({d.split(b' ')[0] for d in text.split(b'\0')[:5]})
  assert seen[0] == {b'0', b'2', b'4', b'6', b'8'} and seen[1] == {b'1', b'3', b'5', b'7', b'9'}


def test_global_batches_do_not_depend_on_how_processes_share_the_streams(tmp_path):
  source = _write_corpus(tmp_path, n=30)
  take = lambda streams, rows: _take(iter(_batches(source, streams=streams, num_streams=4,
                                                   batch_size=rows)), 6)
  one_process = take(range(4), 4)
  two_processes = [take(range(0, 2), 2), take(range(2, 4), 2)]
  for step, batch in enumerate(one_process):
    np.testing.assert_array_equal(batch, np.concatenate([p[step] for p in two_processes]))


def test_iterator_state_of_several_streams_resumes_exactly(tmp_path):
  source = _write_corpus(tmp_path)
  iterator = iter(_batches(source, streams=(0, 1, 2), num_streams=3, batch_size=3))
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  fresh = iter(_batches(source, streams=(0, 1, 2), num_streams=3, batch_size=3))
  fresh.set_state(state)
  np.testing.assert_array_equal(_take(fresh, 4), expected)


def _four_streams(source, streams=range(4), num_streams=4):
  return iter(_batches(source, streams=streams, num_streams=num_streams,
                       batch_size=2 * len(streams)))


def _state_at_a_document_boundary(iterator):
  """Advances until some stream's last batch ended exactly where a document did (no remainder:
  Grain marks it with a tuple, which JSON, as in a checkpoint, turns into a list)."""
  for _ in range(50):
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    if any(s['remainder_slices']['tokens'] == [-1, -1] for s in state['streams'].values()):
      return state
  pytest.fail('no stream ended a batch on a document boundary')


def test_stream_positions_restore_on_another_split_of_the_streams(tmp_path):
  source = _write_corpus(tmp_path, n=30)
  whole = _four_streams(source)
  state = _state_at_a_document_boundary(whole)
  expected = _take(whole, 3)
  halves = [_four_streams(source, range(0, 2)), _four_streams(source, range(2, 4))]
  for half in halves:
    half.set_state(state)  # takes its two streams' positions, ignores the others
  got = [np.concatenate([next(half)['tokens'] for half in halves]) for _ in range(3)]
  np.testing.assert_array_equal(got, expected)


def _save_as_two_processes(state, directory):
  """The files two processes, owning streams 0-1 and 2-3, write into a checkpoint."""
  for process, owned in enumerate((('0', '1'), ('2', '3'))):
    part = {**state, 'streams': {k: state['streams'][k] for k in owned}}
    (directory / f'process_{process}-of-2.json').write_text(json.dumps(part))


def test_checkpoint_of_two_processes_restores_in_one(tmp_path):
  source = _write_corpus(tmp_path, n=30)
  whole = _four_streams(source)
  state = _state_at_a_document_boundary(whole)
  expected = _take(whole, 3)
  _save_as_two_processes(state, epath.Path(tmp_path))
  resumed = _four_streams(source)  # one process here: there is no process_0-of-1.json
  checkpointing.DataIteratorHandler().restore(
      epath.Path(tmp_path), args=checkpointing.DataIteratorRestore(resumed))
  np.testing.assert_array_equal(_take(resumed, 3), expected)


def test_checkpoint_read_in_other_streams_is_a_one_line_error(tmp_path):
  source = _write_corpus(tmp_path, n=30)
  whole = _four_streams(source)
  _take(whole, 2)
  _save_as_two_processes(whole.get_state(), epath.Path(tmp_path))
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r'4 stream\(s\) and this run would read 2 .* '
                     r'--config.data.num_streams=4$'):
    checkpointing.DataIteratorHandler().restore(epath.Path(tmp_path), args=(
        checkpointing.DataIteratorRestore(_four_streams(source, range(2), num_streams=2))))


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
  """Train, validation and test files are disjoint and cover the corpus; the default job's
  validation files are still those whose path crc32 is below 2 (its training files too), a
  test share takes files from training only, and the test files do not move with the
  validation share."""
  files = sources.stdlib_files()
  assert len(files) > 500
  split = lambda name, *args, **kw: sources.split_files(files, name, *args, **kw)
  validation = split('validation', 2)
  assert validation == [f for f in files
                        if zlib.crc32('/'.join(f.split(os.sep)[-2:]).encode()) % 100 < 2]
  assert split('train', 2) == [f for f in files if f not in validation]
  parts = [split(name, 2, 5) for name in ('train', 'validation', 'test')]
  assert parts[1] == validation and parts[2]
  assert sorted(sum(parts, [])) == sorted(files) and len(set(sum(parts, []))) == len(files)
  assert split('test', 10, 5) == parts[2]
  assert split('test', 2, 5) == sources.split_files(list(reversed(files)), 'test', 2, 5)[::-1]
  assert not set(split('validation', 2, seed=7)) & set(validation)  # another draw


def test_file_sources_give_three_splits_or_say_test_is_absent(tmp_path, tiny_config):
  for i in range(40):
    (tmp_path / f'doc{i:02d}.txt').write_bytes(b'document %d' % i)
  d = tiny_config.data
  d.update(source='files', files=str(tmp_path / '*.txt'), validation_percent=20)
  with pytest.raises(sources.SplitAbsent, match='^data.test_percent is 0: '):
    sources.make_source(d, 'test')
  d.test_percent = 20
  documents = {split: {bytes(s[i]) for i in range(len(s))}
               for split in sources.SPLITS for s in [sources.make_source(d, split)]}
  assert all(documents.values()) and sum(map(len, documents.values())) == 40
  assert len(set.union(*documents.values())) == 40  # disjoint
  d.test_percent = 80
  assert _check(tiny_config) == ('data.test_percent: 80 + validation_percent 20 leave no '
                                 'train files')
  d.test_percent = 0
  d.eval_percent = 2  # what a config file written before the rename would set
  assert _check(tiny_config) == 'data.eval_percent: renamed data.validation_percent'


def _check(config):
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check_task(config)
  return str(error.value)


def test_tfds_text_source(tiny_config):
  with tfds.testing.mock_data(num_examples=7):
    source = sources.TfdsTextSource('lm1b', 'train', 'text', 'data.tfds_train_split')
    batch = next(iter(_batches(source)))['tokens']
    d = tiny_config.data
    d.update(source='tfds', tfds_name='lm1b', tfds_test_split='')
    assert len(sources.make_source(d, 'validation')) == 7
    with pytest.raises(sources.SplitAbsent, match='^data.tfds_test_split is empty$'):
      sources.make_source(d, 'test')
  assert len(source) == 7 and batch.shape == (4, 17)


def test_missing_files_are_reported(tiny_config):
  tiny_config.data.update(source='files', files='/nonexistent/**/*.txt')
  with pytest.raises(ValueError, match='no train files'):
    sources.make_source(tiny_config.data, 'train')


def _add_bad_records(tmp_path):
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  (tmp_path / 'gone.txt').symlink_to(tmp_path / 'missing-target')


def test_unusable_records_are_skipped_and_counted(tmp_path):
  _write_corpus(tmp_path, n=10)
  _add_bad_records(tmp_path)
  source = sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))
  stats = pipeline.RecordStats()
  ds = pipeline.batches(source, seq_len=16, batch_size=2, seed=0, shuffle=True, stats=stats,
                        prefetch_batches=0, worker_threads=1)
  text = bytes(np.concatenate(_take(iter(ds), 200)).astype(np.uint8).ravel())
  assert b'caf' not in text
  assert stats.bad >= 3 and abs(stats.bad_fraction - 3 / 13) < 0.1  # 3 of 13 files
  problems = ' | '.join(stats.examples)
  assert 'empty.txt: empty' in problems and 'latin1.txt: invalid UTF-8 at byte 3' in problems
  assert 'gone.txt: FileNotFoundError' in problems
