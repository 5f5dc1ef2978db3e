"""What `python -m prepare` reads and writes: input files checked and read as documents, token ids
written as ArrayRecord shards, and `dataset.json` (the prepared-dataset format)."""

import dataclasses
import json
import os
import tempfile

import apache_beam as beam
import numpy as np
from array_record.python import array_record_module
from etils import epath

from data import sources, tokenizers
from prepare import cleaning
from prepare.report import EXAMPLE_CHARS, event, histogram_event

SUFFIXES = ('.txt', '.jsonl', '.parquet')
_EVENTS = 'events'
# A malformed record's snippet is cut from this many characters, scrubbed, then cut to the
# report's EXAMPLE_CHARS: any address that reaches into those (at most 254 characters) is whole
# when scrubbed, so no part of one is kept.
_SNIPPET_SOURCE = EXAMPLE_CHARS + 256


def input_files(pattern: str, text_key: str) -> list[str]:
  """The files matching `pattern`, each checked readable and holding `text_key`."""
  files = sources.glob_files(pattern)
  if not files:
    raise ValueError(f'input: no files match {pattern!r}')
  for path in files:
    if not path.endswith(SUFFIXES):
      raise ValueError(f'input: {path} is not one of {", ".join(SUFFIXES)}')
    try:
      _check_text_key(path, text_key)
    except OSError as e:
      raise ValueError(f'input: cannot read {path}: {e.strerror or e}') from None
  return files


def _check_text_key(path: str, text_key: str):
  """Reads enough of `path` to know it opens and (for records) has the text field."""
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top; only parquet needs it
    with epath.Path(path).open('rb') as f:
      try:
        names = pq.read_schema(f).names
      except Exception as e:  # pylint: disable=broad-except; pyarrow raises several kinds
        raise ValueError(f'input: {path} is not a Parquet file ({e})') from None
    if text_key not in names:
      raise ValueError(f'text_key: {path} has no column {text_key!r}; its columns: '
                       f'{", ".join(names)}')
    return
  with epath.Path(path).open('rb') as f:
    if not path.endswith('.jsonl'):
      f.read(1)
      return
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # counted as malformed when the pipeline reads it
      if isinstance(record, dict):
        if text_key not in record:
          raise ValueError(f'text_key: {path} has no field {text_key!r}; its first record has: '
                           f'{", ".join(record)}')
        return


def fingerprint(files: list[str]) -> list:
  """Names, sizes and modification times: what says the inputs are unchanged on a rerun."""
  stats = [epath.Path(f).stat() for f in files]
  return [(f, s.length, s.mtime) for f, s in zip(files, stats)]


@beam.typehints.with_output_types(tuple[str, str])  # the main output; events are tagged
class ReadDocuments(beam.DoFn):
  """A file -> (source, text) per document; malformed records become events, not errors, with
  a snippet that `scrub_pii` scrubs as it does the text."""

  def __init__(self, text_key: str, scrub_pii: bool):
    self._text_key, self._scrub_pii = text_key, scrub_pii

  def process(self, path):
    if path.endswith('.txt'):
      yield from self._text(path, epath.Path(path).read_bytes())
    elif path.endswith('.jsonl'):
      with epath.Path(path).open('rb') as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            yield from self._record(f'{path}:{number}', line)
    else:
      yield from self._parquet(path)

  def _malformed(self, reason: str, where: str, raw) -> beam.pvalue.TaggedOutput:
    snippet = repr(raw[:_SNIPPET_SOURCE] if isinstance(raw, (str, bytes)) else raw)
    snippet = f'{where}: {snippet[:_SNIPPET_SOURCE]}'
    if self._scrub_pii:
      snippet = cleaning.scrub_pii(snippet)[0]
    return beam.pvalue.TaggedOutput(_EVENTS, event(f'malformed/{reason}', 1, snippet))

  def _text(self, where, raw):
    if raw is None:
      yield self._malformed('null_text', where, raw)
      return
    if isinstance(raw, bytes):
      try:
        raw = raw.decode('utf-8')
      except UnicodeDecodeError:
        yield self._malformed('not_utf8', where, raw)
        return
    if not isinstance(raw, str):
      yield self._malformed('not_text', where, raw)
      return
    yield where, raw

  def _record(self, where, line):
    try:
      line = line.decode('utf-8')
    except UnicodeDecodeError:
      yield self._malformed('not_utf8', where, line)
      return
    try:
      record = json.loads(line)
    except ValueError:
      yield self._malformed('bad_json', where, line)
      return
    if not isinstance(record, dict) or self._text_key not in record:
      yield self._malformed('missing_text', where, line)
      return
    yield from self._text(where, record[self._text_key])

  def _parquet(self, path):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with epath.Path(path).open('rb') as f:
      row = 0
      for batch in pq.ParquetFile(f).iter_batches(columns=[self._text_key]):
        for value in batch.column(0).to_pylist():
          yield from self._text(f'{path}#{row}', value)
          row += 1


SPLITS = ('train', 'eval', 'test')


def _bucket(content_hash: str) -> int:
  """0..99: the eval split is the documents in the buckets below eval_percent, the test split
  those in the top test_percent."""
  return int(content_hash[:8], 16) % 100


def _hashed_split(content_hash: str, eval_percent: int, test_percent: int = 0) -> str:
  bucket = _bucket(content_hash)
  return 'eval' if bucket < eval_percent else 'test' if bucket >= 100 - test_percent else 'train'


def split_and_shard(content_hash: str, eval_percent: int, split_shards: dict[str, int],
                    moved: dict[str, str], test_percent: int = 0):
  """(split, shard index): the split from the content hash unless `moved` (NoEmptySplit's)
  names the document; stable across runs, runners and workers."""
  split = moved.get(content_hash) or _hashed_split(content_hash, eval_percent, test_percent)
  return split, int(content_hash[8:16], 16) % split_shards[split]


class NoEmptySplit(beam.CombineFn):
  """Content hashes -> {hash: split} for the one document, if any, moved so that neither split
  is empty: when 2 or more documents are kept and `eval_percent` of them by hash rounds to none,
  the one nearest to the eval side goes to eval (to train when the hashes put all in eval).
  A corpus of a few hundred documents or more moves none, so each stays where its hash puts it."""

  def __init__(self, eval_percent: int):
    self._eval_percent = eval_percent

  def create_accumulator(self):
    return 0, 0, None, None  # documents, eval documents, lowest and highest (bucket, hash)

  def add_input(self, acc, content_hash):
    key = (_bucket(content_hash), content_hash)
    in_eval = _hashed_split(content_hash, self._eval_percent) == 'eval'
    return self.merge_accumulators([acc, (1, int(in_eval), key, key)])

  def merge_accumulators(self, accumulators):
    accumulators = list(accumulators)
    keys = [k for acc in accumulators for k in acc[2:] if k is not None]
    return (sum(a[0] for a in accumulators), sum(a[1] for a in accumulators),
            min(keys, default=None), max(keys, default=None))

  def extract_output(self, acc):
    documents, in_eval, lowest, highest = acc
    if documents < 2 or not self._eval_percent:
      return {}
    if not in_eval:
      return {lowest[1]: 'eval'}
    return {highest[1]: 'train'} if in_eval == documents else {}


@beam.typehints.with_output_types(tuple[tuple[str, int], tuple[str, bytes]])
class Tokenise(beam.DoFn):
  """[hash, text] -> ((split, shard), (hash, '<u4' token-id bytes)), plus token-count events;
  `moved` (a side input) is NoEmptySplit's output."""

  def __init__(self, spec: str, eval_percent: int, split_shards: dict[str, int],
               test_percent: int = 0):
    self._spec, self._eval_percent, self._split_shards = spec, eval_percent, split_shards
    self._test_percent = test_percent
    self._tokenizer = None

  def setup(self):
    self._tokenizer = tokenizers.load(self._spec)

  def process(self, element, moved):
    content_hash, text = element
    ids = self._tokenizer.encode(text)
    split, shard = split_and_shard(content_hash, self._eval_percent, self._split_shards, moved,
                                   self._test_percent)
    yield beam.pvalue.TaggedOutput(_EVENTS, event(f'split/{split}/documents'))
    yield beam.pvalue.TaggedOutput(_EVENTS, event(f'split/{split}/tokens', len(ids)))
    yield beam.pvalue.TaggedOutput(_EVENTS, histogram_event('tokens', len(ids)))
    yield (split, shard), (content_hash, np.asarray(ids, '<u4').tobytes())


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


def _write_array_record(path: str, records):
  """Writes through a local file (ArrayRecord writes local paths only), then moves it in place,
  so a stage that dies midway never leaves a half-written shard under the final name."""
  directory = None if '://' in path else os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(suffix='.array_record', dir=directory)
  os.close(fd)
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  if directory is None:
    epath.Path(tmp).copy(path, overwrite=True)
    os.remove(tmp)
  else:
    os.replace(tmp, path)


def write_shard(group, output: str, split_shards: dict[str, int]):
  """One shard's records, in content-hash order, so every runner writes the same bytes."""
  (split, index), records = group
  _write_array_record(f'{output}/{shard_name(split, index, split_shards[split])}',
                      (ids for _, ids in sorted(records)))


def _shard_files(out: epath.Path, split: str) -> list[epath.Path]:
  return sorted(out.glob(f'{split}-*-of-*.array_record'))


def remove_shards(out: epath.Path):
  for split in SPLITS:
    for path in _shard_files(out, split):
      path.unlink()


def add_empty_shards(out: epath.Path, split_shards: dict[str, int]):
  for split, count in split_shards.items():
    for index in range(count):
      if not (out / shard_name(split, index, count)).exists():
        _write_array_record(str(out / shard_name(split, index, count)), [])


def write_dataset_json(out: epath.Path, spec: str, splits: dict, options, input_pattern: str):
  tokenizer = tokenizers.load(spec)
  args = {'input': input_pattern, 'output': str(out), **dataclasses.asdict(options)}
  dataset = {
      'format': sources.PREPARED_FORMAT,
      'tokenizer': 'bytes' if spec == 'bytes' else epath.Path(spec).name,
      'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id,
      'splits': {split: {'files': [p.name for p in _shard_files(out, split)], **counts}
                 for split, counts in splits.items()},
      'args': args}
  (out / 'dataset.json').write_text(json.dumps(dataset, indent=1))
