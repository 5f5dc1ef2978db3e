"""Training reads prepared datasets (data.source=arrayrecord), weighted mixtures of them, and
raw text through a SentencePiece or Hugging Face tokenizer."""

import json
import glob
import os
import sysconfig

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data import pipeline, sources, tokenizers
from tasks import language_model, lm_samples
from tests.test_train_e2e import run_train
from tools import sample
from training import config_check, metrics


def write_prepared(directory, splits, tokenizer='bytes', vocab_size=256, eos_id=0):
  """A prepared dataset (contract: prepare/storage.py's output): `splits` maps each split to its
  documents' token ids, one ArrayRecord file per split; `tokenizer`: 'bytes' or a file copied in."""
  os.makedirs(directory, exist_ok=True)
  described = {}
  for split, documents in splits.items():
    name = f'{split}-00000-of-00001.array_record'
    writer = ArrayRecordWriter(os.path.join(directory, name), 'group_size:1')
    for ids in documents:
      writer.write(ids if isinstance(ids, bytes) else np.asarray(ids, '<u4').tobytes())
    writer.close()
    described[split] = {'files': [name], 'documents': len(documents),
                        'tokens': sum(len(d) for d in documents)}
  name = 'bytes'
  if tokenizer != 'bytes':
    name = os.path.basename(tokenizer)
    with open(tokenizer, 'rb') as f, open(os.path.join(directory, name), 'wb') as out:
      out.write(f.read())
  info = {'format': 'podium-prepared-v1', 'tokenizer': name, 'vocab_size': vocab_size,
          'eos_id': eos_id, 'splits': described, 'args': {}}
  with open(os.path.join(directory, 'dataset.json'), 'w') as f:
    json.dump(info, f)
  return str(directory)


def _ranged(low, high, n, length=20, seed=0):
  """`n` documents of `length` ids drawn from [low, high): a component's mark."""
  rng = np.random.default_rng(seed)
  return [rng.integers(low, high, length) for _ in range(n)]


def _data_config(**keys):
  d = language_model.default_data_config()
  d.update(keys)
  return d


def _batches(source, streams=range(2), num_streams=2, batch_size=4, seed=0, **kwargs):
  return iter(pipeline.batches(source, seq_len=32, batch_size=batch_size, seed=seed,
                               shuffle=True, streams=streams, num_streams=num_streams, **kwargs))


def _take(iterator, n):
  return np.stack([next(iterator)['tokens'] for _ in range(n)])


@pytest.fixture(scope='module')
def mixture(tmp_path_factory):
  """Two prepared datasets: 'low' documents hold ids 1..99, 'high' ones ids 100..199."""
  root = tmp_path_factory.mktemp('prepared')
  low = write_prepared(root / 'low', {'train': _ranged(1, 100, 50), 'eval': _ranged(1, 100, 9)})
  high = write_prepared(root / 'high', {'train': _ranged(100, 200, 30, seed=1),
                                        'eval': _ranged(100, 200, 7, seed=1)})
  return low, high


def test_prepared_documents_are_read_with_eos_appended(mixture):
  source = sources.make_source(_data_config(source='arrayrecord', path=mixture[0]), 'train')
  assert len(source) == 50
  np.testing.assert_array_equal(source[3], _ranged(1, 100, 50)[3])
  tokens = pipeline.tokenize(source[3])['tokens']
  assert tokens.dtype == np.int32 and tokens[-1] == 0 and len(tokens) == 21


def test_mixture_draws_documents_in_its_proportions(mixture):
  source = sources.make_source(
      _data_config(source='arrayrecord', mixture=f'{mixture[0]}:7,{mixture[1]}:3'), 'train')
  batches = _take(_batches(source), 200)
  low, high = ((batches > 0) & (batches < 100)).sum(), (batches >= 100).sum()
  assert low / (low + high) == pytest.approx(0.7, abs=0.02)  # documents are all 20 ids long
  windows = batches.reshape(8, -1)  # 25 batches each: interleaved, not in long runs
  share = ((windows > 0) & (windows < 100)).sum(1) / (windows > 0).sum(1)
  np.testing.assert_allclose(share, 0.7, atol=0.05)


def test_mixture_resumes_exactly_and_on_another_split_of_its_streams(mixture):
  source = sources.make_source(
      _data_config(source='arrayrecord', mixture=f'{mixture[0]}:0.7,{mixture[1]}:0.3'), 'train')
  whole = _batches(source, streams=range(4), num_streams=4)
  _take(whole, 7)
  state = json.loads(json.dumps(whole.get_state()))  # as a checkpoint holds it
  expected = _take(whole, 5)
  fresh = _batches(source, streams=range(4), num_streams=4)
  fresh.set_state(state)
  np.testing.assert_array_equal(_take(fresh, 5), expected)
  halves = [_batches(source, streams=s, num_streams=4, batch_size=2) for s in (range(2),
                                                                             range(2, 4))]
  for half in halves:
    half.set_state(state)
  np.testing.assert_array_equal(np.stack([np.concatenate([next(h)['tokens'] for h in halves])
                                          for _ in range(5)]), expected)
  other_seed = _take(_batches(source, seed=1), 3)
  assert not np.array_equal(other_seed, _take(_batches(source), 3))


def test_unreadable_prepared_records_are_skipped_and_counted(tmp_path):
  path = write_prepared(tmp_path, {'train': [*_ranged(1, 100, 8), b'abc', [5, 300]]})
  source = sources.make_source(_data_config(source='arrayrecord', path=path), 'train')
  stats = pipeline.RecordStats()
  batches = _take(_batches(source, streams=(0,), num_streams=1, stats=stats, worker_threads=1,
                           prefetch_batches=0), 30)
  assert batches.max() < 256 and stats.bad >= 2
  problems = ' | '.join(stats.examples)
  assert 'record 8: ValueError' in problems and 'token id 300 is not below' in problems


def _check(config):
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check_task(config)
  return str(error.value)


def test_bad_prepared_data_is_a_one_line_error(tiny_config, tmp_path, mixture):
  d = tiny_config.data
  d.update(source='arrayrecord', path=str(tmp_path / 'none'))
  assert _check(tiny_config).startswith('data.path: cannot read ')
  (tmp_path / 'dataset.json').write_text('{"format": "something else"}')
  d.path = str(tmp_path)
  assert _check(tiny_config).startswith('data.path: ') and 'podium-prepared-v1' in _check(
      tiny_config)
  d.source = 'stdlib'
  assert _check(tiny_config) == (f"data.path: set to {str(tmp_path)!r}, but "
                                 "data.source='stdlib' does not read it")
  d.update(source='arrayrecord', path='', mixture=f'{mixture[0]}:1,{mixture[1]}')
  assert _check(tiny_config).startswith("data.mixture: '") and '\n' not in _check(tiny_config)
  d.update(path=write_prepared(tmp_path / 'train_only', {'train': _ranged(1, 9, 3)}),
           mixture='')
  with pytest.raises(ValueError, match=r'^data.path: .* lists no eval files$'):
    sources.make_source(d, 'validation')


def test_a_prepared_dataset_validates_on_eval_and_tests_on_test_if_it_has_one(mixture, tmp_path):
  d = _data_config(source='arrayrecord', path=mixture[0])
  assert len(sources.make_source(d, 'validation')) == 9  # prepare's eval split
  with pytest.raises(sources.SplitAbsent, match=r'^data.path: .* lists no test files$'):
    sources.make_source(d, 'test')
  d.path = write_prepared(tmp_path, {'train': _ranged(1, 9, 3), 'eval': _ranged(1, 9, 2),
                                     'test': _ranged(1, 9, 4)})
  assert len(sources.make_source(d, 'test')) == 4


@pytest.fixture(scope='module')
def text():
  """~24 KB of Python source, and tokenizers trained on it."""
  root = sysconfig.get_paths()['stdlib']
  files = sorted(glob.glob(os.path.join(root, 'json', '*.py')))
  return [open(f, encoding='utf-8').read()[:6000] for f in files]


@pytest.fixture(scope='module')
def trained(text, tmp_path_factory):
  out = tmp_path_factory.mktemp('tokenizers')
  sizes = {'sentencepiece': 400, 'bpe': 300}  # SentencePiece: 256 bytes and every character
  return {kind: tokenizers.train(text, kind, n, str(out / kind)) for kind, n in sizes.items()}


def test_vocab_larger_than_the_model_is_a_one_line_error(tiny_config, trained, mixture):
  tiny_config.data.tokenizer = trained['bpe']
  assert _check(tiny_config) == (f"model.vocab_size: 256 is smaller than the tokenizer's 300 "
                                 f"tokens ({trained['bpe']})")
  tiny_config.model.vocab_size = 320
  config_check.check_task(tiny_config)
  tiny_config.data.update(source='arrayrecord', path=mixture[0])
  assert _check(tiny_config).startswith('data.tokenizer: must be empty for data.source=arrayrec')


def test_mixture_of_two_tokenizers_is_a_one_line_error(tiny_config, trained, tmp_path, mixture):
  other = write_prepared(tmp_path, {'train': _ranged(1, 9, 3)}, tokenizer=trained['bpe'],
                         vocab_size=300)
  tiny_config.data.update(source='arrayrecord', mixture=f'{mixture[0]}:1,{other}:1')
  assert _check(tiny_config) == (f'data.mixture: {other} was tokenised with another tokenizer '
                                 f'than {mixture[0]}; a mixture needs one tokenizer')


@pytest.mark.parametrize('kind', tokenizers.KINDS)
def test_raw_text_is_encoded_with_the_tokenizer(kind, trained, text, tmp_path):
  tokenizer = tokenizers.load(trained[kind])
  text = [t[:600] for t in text]
  for i, t in enumerate(text):
    (tmp_path / f'{i}.txt').write_text(t)
  source = sources.FileSource(sorted(str(p) for p in tmp_path.glob('*.txt')))
  rows = _take(_batches(source, streams=(0,), num_streams=1, batch_size=1, tokenizer=tokenizer),
               100).ravel()
  assert rows.max() >= 256  # merged pieces, not bytes
  documents = np.split(rows, np.flatnonzero(rows == tokenizer.eos_id) + 1)[1:-1]
  assert len(documents) >= 3 and all(tokenizer.decode(d[:-1]) in text for d in documents)


@pytest.mark.parametrize('kind', tokenizers.KINDS)
def test_bits_per_byte_counts_the_bytes_each_token_stands_for(kind, trained, text):
  tokenizer = tokenizers.load(trained[kind])
  lengths = language_model.token_byte_lengths(tokenizer)
  encoded = sum(lengths[tokenizer.encode(t)].sum() for t in text)
  assert encoded == pytest.approx(sum(len(t.encode()) for t in text), rel=0.002)
  assert (language_model.token_byte_lengths(tokenizers.load('')) == 1).all()


def test_a_mixture_of_sentencepiece_datasets_trains_and_samples(tmp_path, trained, text):
  """train.py end to end on prepared data: eval on the mixture, samples decoded with the
  datasets' tokenizer, and tools.sample finds the same tokenizer from the workdir."""
  tokenizer = tokenizers.load(trained['sentencepiece'])
  encoded = [tokenizer.encode(t[start:start + 400]) for t in text for start in (0, 2000, 4000)]
  components = [write_prepared(tmp_path / name, {'train': part[2:], 'eval': part[:2]},
                               trained['sentencepiece'], tokenizer.vocab_size, tokenizer.eos_id)
                for name, part in (('a', encoded[::2]), ('b', encoded[1::2]))]
  run = tmp_path / 'run'
  result = run_train(run, '--config.data.source=arrayrecord', '--config.model.vocab_size=400',
                     f'--config.data.mixture={components[0]}:0.7,{components[1]}:0.3',
                     '--config.task.sample_temperature=0', '--config.task.sample_length=12')
  assert result.returncode == 0, result.stderr
  evals = [r for r in metrics.read_metrics(run) if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [4, 8]
  for r in evals:  # SentencePiece tokens stand for more than a byte each
    assert 0 < r['eval/bits_per_byte'] < r['eval/loss'] / np.log(2)
  config, make_model, params = sample.load(str(run))
  run_tokenizer = sample.load_tokenizer(config)
  assert run_tokenizer.spec == os.path.join(components[0], 'tokenizer.model')
  texts = lm_samples.generate(make_model, params, ['def '], new_tokens=12, temperature=0.0,
                              max_len=config.model.max_len, tokenizer=run_tokenizer)
  assert texts[0].startswith('def ') and f'--- sample ---\n{texts[0]}\n' in result.stdout
