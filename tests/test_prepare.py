"""`python -m prepare`: cleaning rules, dedup, the report, reruns, bad input and the shards,
on a small planted corpus run through Beam's local runner."""

import collections
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import pipeline, sources, tokenizers
from prepare import cleaning, command, dedup, storage
from prepare import pipeline as prepare_pipeline
from tests.conftest import REPO
from tests.test_prepared_data import write_prepared

_WORDS = ('river stone garden window letter morning silver forest candle harbor meadow lantern '
          'orchard pebble thunder violet whisper autumn bridge canyon desert ember falcon glacier '
          'hollow island jasmine kettle lagoon marble nectar oasis prairie quartz saddle timber '
          'umbrella valley willow yonder zephyr anchor basket cobalt dune ferry grove').split()


def _prose(seed: int, words: int = 400) -> str:
  rng = random.Random(seed)
  sentences, out = [], []
  for i in range(words):
    out.append(rng.choice(_WORDS))
    if i % 12 == 11:
      sentences.append(' '.join(out).capitalize() + '.')
      out = []
  return ' '.join(sentences)


def _edit(text: str, seed: int, count: int = 3) -> str:
  """`text` with `count` words replaced: a near copy."""
  words = text.split(' ')
  rng = random.Random(seed)
  for i in rng.sample(range(len(words)), count):
    words[i] = 'EDITED'
  return ' '.join(words)


# Documents planted to break exactly one rule each, with the options below.
BREAKS = {
    'min_chars': 'Too short.',
    'max_chars': _prose(900, 1000),
    'min_alpha_ratio': '1 2 3 4 5 6 7 8 9 0 ' * 6 + ' word',
    'max_symbol_ratio': 'abcd{}[]();: ' * 20,
    'max_digit_ratio': ' '.join(f'values {i * 104729:012d}' for i in range(10)),
    'max_dup_line_ratio': 'A line that repeats.\n' * 10 + 'And one that does not.',
    'max_dup_ngram_ratio': ' '.join(['the same ten words said over and over again here'] * 6),
}
OPTIONS = dict(tokenizer='bpe', vocab_size=300, num_shards=3, eval_percent=20, test_percent=20,
               scrub_pii=True, rules=cleaning.Rules(max_chars=5000))


def _write_corpus(root) -> dict:
  """Writes the corpus; returns the raw texts that should survive, keyed by a name."""
  root.mkdir(exist_ok=True)
  kept = {f'prose{i}': _prose(i) for i in range(8)}
  # Near-copy clusters keep the member with the smallest content hash.
  clusters = {'prose1': [_edit(kept['prose1'], 1), _edit(kept['prose1'], 2)],
              'prose2': [_edit(kept['prose2'], 3)]}
  kept['pii'] = 'Write to ada@example.com or call 10.0.0.1 at noon. ' + _prose(50)
  files = {f'{name}.txt': text for name, text in kept.items()}
  files['exact_copy.txt'] = kept['prose0'].replace(' ', '  ') + '\r\n\r\n\r\n'
  for name, copies in clusters.items():
    files.update({f'{name}_near{i}.txt': text for i, text in enumerate(copies)})
    kept[name] = min([kept[name]] + copies, key=lambda t: dedup.content_hash(cleaning.normalise(t)))
  files.update({f'break_{rule}.txt': text for rule, text in BREAKS.items()})
  for name, text in files.items():
    (root / name).write_text(text)
  with open(root / 'records.jsonl', 'wb') as f:
    f.write(json.dumps({'text': _prose(60), 'id': 1}).encode() + b'\n')
    f.write(b'{"text": "not closed, mail bob@example.org\n')
    f.write(json.dumps({'text': None}).encode() + b'\n')
    f.write(b'{"text": "\xff\xfe bytes from 192.168.7.1"}\n')
  kept['jsonl'] = _prose(60)
  pq.write_table(pa.table({'text': [_prose(70), None], 'n': [1, 2]}), root / 'table.parquet')
  kept['parquet'] = _prose(70)
  return kept


def _prepare(input_pattern: str, output: str, **options) -> dict:
  return prepare_pipeline.run(input_pattern, output, command.Options(**options))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepare')
  kept = _write_corpus(root / 'in')
  report = _prepare(f'{root}/in/*', str(root / 'out'), **OPTIONS)
  return root, kept, report


def test_normalise():
  text = '  <p>Caf\u0065\u0301 &amp; tea</p>\r\nline\x07 two\t\t  here   \n\n\n\n\nend\x00  '
  assert cleaning.normalise(text) == 'Caf\u00e9 & tea\nline two here\n\nend'
  assert cleaning.normalise('def f():\n    return  1\n') == 'def f():\n    return 1'


@pytest.mark.parametrize('rule', sorted(BREAKS))
def test_each_rule_drops_what_it_should(rule):
  rules = OPTIONS['rules']
  assert cleaning.failed_rule(cleaning.normalise(BREAKS[rule]), rules) == rule
  assert cleaning.failed_rule(cleaning.normalise(_prose(1)), rules) is None


def test_scrub_pii():
  text, counts = cleaning.scrub_pii('mail a.b@x.org, hosts 192.168.1.20 and fe80::1:2:3, '
                                    'not 1.2.3 nor a::b')
  assert text == ('mail <EMAIL>, hosts <IP_ADDRESS> and <IP_ADDRESS>, not 1.2.3 nor a::b')
  assert counts == {'email': 1, 'ip': 2}


def test_the_default_rules_keep_python_source():
  sources = [open(f, encoding='utf-8').read() for f in
             sorted(os.path.join(REPO, d, f) for d in ('data', 'training')
                    for f in os.listdir(os.path.join(REPO, d)) if f.endswith('.py'))]
  failed = [cleaning.failed_rule(cleaning.normalise(s), cleaning.Rules()) for s in sources]
  assert failed.count(None) >= 0.9 * len(failed), collections.Counter(failed)


def test_union_find_keeps_the_smallest_hash_whatever_the_order():
  pairs = [('d', 'c'), ('b', 'c'), ('x', 'y')]
  for order in (pairs, pairs[::-1]):
    assert dedup.clusters(order) == {'c': 'b', 'd': 'b', 'y': 'x'}


def test_report_counts_rules_duplicates_malformed_and_pii(run):
  root, kept, report = run
  assert {rule: v['count'] for rule, v in report['dropped'].items()} == {r: 1 for r in BREAKS}
  assert report['dropped']['min_chars']['examples'] == ['Too short.']
  assert report['exact_duplicates']['documents_dropped'] == 1
  assert report['exact_duplicates']['clusters'] == 1
  assert report['near_duplicates']['documents_dropped'] == 3
  assert report['near_duplicates']['clusters'] == 2
  assert {k: v['count'] for k, v in report['malformed'].items()} == {
      'bad_json': 1, 'null_text': 2, 'not_utf8': 1}
  assert any('records.jsonl:2' in e for e in report['malformed']['bad_json']['examples'])
  # --scrub_pii scrubs the snippets of malformed records too, not only the kept text.
  assert '<EMAIL>' in report['malformed']['bad_json']['examples'][0]
  assert '<IP_ADDRESS>' in report['malformed']['not_utf8']['examples'][0]
  written = (root / 'out' / 'report.json').read_text()
  assert 'bob@example.org' not in written and '192.168.7.1' not in written
  assert report['pii_scrubbed'] == {'email': 1, 'ip': 1}
  assert report['documents_out'] == len(kept)
  assert report['documents_in'] == len(kept) + 4 + len(BREAKS)
  assert sum(report['histograms']['chars_in'].values()) == report['documents_in']
  assert sum(report['histograms']['tokens'].values()) == report['documents_out']
  assert report['stages'] == {'clean': 'ran', 'tokenizer': 'ran', 'shards': 'ran'}


def test_shards_hold_the_tokenised_kept_documents(run):
  root, kept, report = run
  out = root / 'out'
  dataset = json.loads((out / 'dataset.json').read_text())
  assert dataset['format'] == 'podium-prepared-v1' and dataset['tokenizer'] == 'tokenizer.json'
  tokenizer = tokenizers.load(str(out / 'tokenizer.json'))
  assert dataset['vocab_size'] == tokenizer.vocab_size and dataset['eos_id'] == tokenizer.eos_id
  found = []
  for split in ('train', 'eval', 'test'):
    files = [str(out / f) for f in dataset['splits'][split]['files']]
    assert len(files) == {'train': 3, 'eval': 1, 'test': 1}[split]
    source = grain.sources.ArrayRecordDataSource(files)
    records = [np.frombuffer(source[i], '<u4').tolist() for i in range(len(source))]
    assert len(records) == dataset['splits'][split]['documents'] == report['splits'][split][
        'documents']
    found += records
  texts = [cleaning.scrub_pii(cleaning.normalise(t))[0] for t in kept.values()]
  assert sorted(found) == sorted(tokenizer.encode(t).tolist() for t in texts)
  assert report['splits']['eval']['documents'] > 0  # 20% of 11: the split is exercised
  assert len(sources.PreparedDataset(str(out)).source('test')) == report['splits']['test'][
      'documents'] > 0  # what a training run tests on


def test_rerun_skips_done_stages_and_changed_arguments_redo(run, tmp_path):
  root, _, report = run
  out = tmp_path / 'out'
  shutil.copytree(root / 'out', out)  # the other tests read the fixture's own output
  again = _prepare(f'{root}/in/*', str(out), **OPTIONS)
  assert again['stages'] == {'clean': 'skipped', 'tokenizer': 'skipped', 'shards': 'skipped'}
  assert {k: v for k, v in again.items() if k != 'stages'} == {
      k: v for k, v in report.items() if k != 'stages'}
  resharded = _prepare(f'{root}/in/*', str(out),
                              **{**OPTIONS, 'num_shards': 2})
  assert resharded['stages'] == {'clean': 'skipped', 'tokenizer': 'skipped', 'shards': 'ran'}
  assert len(list(out.glob('train-*.array_record'))) == 2
  assert resharded['splits'] == report['splits']
  stricter = _prepare(f'{root}/in/*', str(out),
                             **{**OPTIONS, 'num_shards': 2, 'near_dup_threshold': 0.97})
  assert stricter['stages'] == {'clean': 'ran', 'tokenizer': 'ran', 'shards': 'ran'}
  assert stricter['near_duplicates']['documents_dropped'] == 0


def test_parquet_column_and_workers_give_the_same_shards(tmp_path, capfd):
  pq.write_table(pa.table({'body': [_prose(i) for i in range(6)] + [_prose(1)]}),
                 tmp_path / 'a.parquet')
  shards = []
  for workers in (1, 2):
    out = tmp_path / f'out{workers}'
    report = _prepare(str(tmp_path / '*.parquet'), str(out), text_key='body',
                      workers=workers, num_shards=2)
    assert report['documents_out'] == 6
    shards.append([(out / f).read_bytes() for f in sorted(os.listdir(out)) if 'array_rec' in f])
  assert shards[0] == shards[1]
  # The worker processes' own logs go to a file, not to the terminal.
  assert 'sdk harness' in (tmp_path / 'out2' / '_work' / 'clean' / 'workers.log').read_text()
  assert 'sdk harness' not in capfd.readouterr().err


@pytest.mark.parametrize('make, pattern, message', [
    (lambda d: None, 'nothing-*.txt', 'input: no files match'),
    (lambda d: pq.write_table(pa.table({'body': ['x'], 'id': [1]}), d / 'a.parquet'),
     'a.parquet', "text_key: {d}/a.parquet has no column 'text'; its columns: body, id"),
    (lambda d: (d / 'a.parquet').write_text('not parquet'),
     'a.parquet', 'input: {d}/a.parquet is not a Parquet file'),
    (lambda d: (d / 'a.csv').write_text('text\nx\n'),
     'a.csv', 'input: {d}/a.csv is not one of .txt, .jsonl, .parquet'),
    (lambda d: (d / 'a.jsonl').write_text('{"body": "x"}\n'),
     'a.jsonl', "text_key: {d}/a.jsonl has no field 'text'; its first record has: body"),
])
def test_bad_input_is_a_one_line_error(tmp_path, make, pattern, message):
  make(tmp_path)
  with pytest.raises(ValueError) as error:
    _prepare(str(tmp_path / pattern), str(tmp_path / 'out'))
  assert str(error.value).startswith(message.format(d=tmp_path))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'out').exists()  # refused before writing anything


@pytest.mark.parametrize('output, message', [
    ('a.txt', 'output: {d}/a.txt is a file; name a directory'),
    ('a.txt/out', 'output: cannot write the directory {d}/a.txt/out: Not a directory'),
])
def test_output_that_cannot_be_a_directory_is_a_one_line_error(tmp_path, output, message):
  (tmp_path / 'a.txt').write_text(_prose(0))
  with pytest.raises(ValueError) as error:
    _prepare(str(tmp_path / 'a.txt'), str(tmp_path / output))
  assert str(error.value) == message.format(d=tmp_path)


def test_near_dup_threshold_without_lsh_banding_is_a_one_line_error(tmp_path):
  (tmp_path / 'a.txt').write_text(_prose(0))
  with pytest.raises(ValueError, match=re.escape(
      'near_dup_threshold: 0.999 with num_perm=128 gives no LSH banding')):
    _prepare(str(tmp_path / 'a.txt'), str(tmp_path / 'out'), near_dup_threshold=0.999)
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('options, message', [
    (dict(eval_percent=100), 'eval_percent: 100 is not in [0, 100)'),
    (dict(eval_percent=50, test_percent=50), 'test_percent: 50 is not in [0, 100 - eval_percent)'),
    (dict(tokenizer='words'), "tokenizer: 'words' is not bytes, sentencepiece or bpe"),
    (dict(rules=cleaning.Rules(max_digit_ratio=2.0)), 'max_digit_ratio: 2.0 is not in [0, 1]'),
])
def test_bad_options_are_one_line_errors(options, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    command.Options(**options).validate()


def _splits(hashes, eval_percent):
  """Each hash's split, as the shards stage chooses it (NoEmptySplit over two merged halves)."""
  fn = storage.NoEmptySplit(eval_percent)
  halves = [functools.reduce(fn.add_input, part, fn.create_accumulator())
            for part in (hashes[::2], hashes[1::2])]
  moved = fn.extract_output(fn.merge_accumulators(halves))
  return _hashed_splits(hashes, eval_percent, moved)


def _hashed_splits(hashes, eval_percent, moved=None):
  return [storage.split_and_shard(h, eval_percent, {'train': 2, 'eval': 1}, moved or {})[0]
          for h in hashes]


def test_no_split_is_empty_and_each_document_keeps_its_hashed_split():
  for eval_percent in (1, 20, 99):
    for n in range(2, 40):
      hashes = [dedup.content_hash(f'{eval_percent} {n} {i}') for i in range(n)]
      splits = _splits(hashes, eval_percent)
      assert 'eval' in splits and 'train' in splits, (eval_percent, n)
      moved = sum(a != b for a, b in zip(splits, _hashed_splits(hashes, eval_percent)))
      assert moved <= 1
  hashes = [dedup.content_hash(str(i)) for i in range(3000)]
  assert _splits(hashes, 1) == _hashed_splits(hashes, 1)  # large: the hash alone decides
  assert _splits(hashes[:5], 0) == ['train'] * 5  # --eval_percent=0: no eval split


def _run_cli(cwd, *args, env=None):
  env = {**os.environ, 'PYTHONPATH': REPO, **(env or {})}
  return subprocess.run([sys.executable, '-m', 'prepare', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, check=False)


def test_cli_on_a_small_corpus_from_another_folder_is_quiet_with_both_splits(tmp_path):
  """Three documents, relative paths, the default --eval_percent=1: by hash none would be in
  eval; one is, and the tool prints its own lines only (Beam's logs need --verbosity=1)."""
  (tmp_path / 'corpus').mkdir()
  texts = [_prose(i, 60) for i in range(3)]
  for i, text in enumerate(texts):
    (tmp_path / 'corpus' / f'{i}.txt').write_text(text)
  hashes = [dedup.content_hash(cleaning.normalise(t)) for t in texts]
  assert all(int(h[:8], 16) % 100 >= 1 for h in hashes)  # by hash alone, eval would be empty
  result = _run_cli(tmp_path, '--input=corpus/*.txt', '--output=prepared')
  assert result.returncode == 0, result.stderr
  assert re.fullmatch(r'3 documents in, 3 kept: train 2 \([\d,]+ tokens\), eval 1 \([\d,]+ '
                      r'tokens\); prepared/report\.json has the details\n', result.stdout)
  assert [line for line in result.stderr.splitlines() if not line.startswith('prepare: ')] == []
  report = json.loads((tmp_path / 'prepared' / 'report.json').read_text())
  assert {k: v['documents'] for k, v in report['splits'].items()} == {'train': 2, 'eval': 1}
  assert len(sources.PreparedDataset(str(tmp_path / 'prepared')).source('validation')) == 1
  verbose = _run_cli(tmp_path, '--input=corpus/*.txt', '--output=prepared', '--verbosity=1')
  assert verbose.returncode == 0 and 'apitools not found' in verbose.stderr


def test_unusable_input_is_refused_and_leaves_no_dataset(run, tmp_path):
  root, _, _ = run
  out = tmp_path / 'out'
  shutil.copytree(root / 'out', out)  # an earlier run's dataset must not pass for this one's
  (tmp_path / 'in').mkdir()
  for name, text in {'a.txt': 'Too short.', 'b.txt': '', 'c.jsonl': '{"text": "x\n',
                     'd.jsonl': ''}.items():
    (tmp_path / 'in' / name).write_text(text)
  with pytest.raises(ValueError, match=re.escape('input: the files hold no documents')):
    _prepare(f'{tmp_path}/in/d.jsonl', str(out))
  assert not (out / 'dataset.json').exists() and not (out / 'report.json').exists()
  with pytest.raises(ValueError, match=re.escape(
      'input: 0 of 2 documents kept: 2 dropped by min_chars; see --min_chars; malformed '
      'records skipped: 1 bad_json')):
    _prepare(f'{tmp_path}/in/*', str(out))
  assert not (out / 'dataset.json').exists()
  (tmp_path / 'in' / 'e.txt').write_text(_prose(1))
  with pytest.raises(ValueError, match=re.escape('eval_percent: 1 document kept, too few')):
    _prepare(f'{tmp_path}/in/*', str(out))


def test_cli_exits_2_with_one_line(tmp_path):
  result = _run_cli(tmp_path, '--input=none*.txt', '--output=out')
  assert result.returncode == 2
  assert result.stderr == f"prepare: error: input: no files match '{tmp_path}/none*.txt'\n"
  assert not (tmp_path / 'out').exists()


def test_without_the_prepare_extra_one_line_says_what_to_install(tmp_path):
  blocked = tmp_path / 'blocked' / 'apache_beam'
  blocked.mkdir(parents=True)
  (blocked / '__init__.py').write_text(
      "raise ModuleNotFoundError(\"No module named 'apache_beam'\", name='apache_beam')\n")
  env = {'PYTHONPATH': f'{tmp_path / "blocked"}{os.pathsep}{REPO}'}
  result = _run_cli(tmp_path, '--input=a.txt', '--output=out', env=env)
  assert result.returncode == 2
  assert result.stderr == ("prepare: error: python -m prepare needs apache_beam, from "
                           "podium's prepare extra: pip install -e '.[prepare]'\n")
  usage = _run_cli(tmp_path, '--help', env=env)  # --help needs no extra
  assert '--eval_percent' in usage.stdout and usage.stderr == ''


def test_training_on_an_empty_eval_split_names_the_fix(tmp_path):
  path = write_prepared(tmp_path / 'prepared', {'train': [[1, 2, 3]] * 2, 'eval': []})
  source = sources.PreparedDataset(path).source('validation')
  with pytest.raises(ValueError, match=re.escape(
      'has fewer documents than the 1 streams: re-run python -m prepare with a larger '
      '--eval_percent')):
    pipeline.batches(source, seq_len=8, batch_size=1, seed=0, shuffle=False)
