"""Prepares a text corpus for training: `python -m data.prepare --input=GLOB --output=DIR [flags]`.

An Apache Beam pipeline: read .txt / .jsonl / .parquet files (local or gs://), normalise, drop
what fails the quality rules, scrub PII if asked, drop exact and near duplicates, train a
tokenizer on a sample, tokenise, and write ArrayRecord shards, `dataset.json` and a quality
report (`report.json`, `report/*.png`). Runs on the DirectRunner (`--workers=N` processes), or
on Flink / Spark / Dataflow with Beam's options after `--` (e.g. `-- --runner=DataflowRunner`).

Three stages (clean, tokenizer, shards) each finish with a `_DONE` marker under `DIR/_work/`
holding a hash of their arguments and the input files' names, sizes and times; a rerun skips
the stages whose hash matches and redoes the rest.
"""

import dataclasses
import hashlib
import json
import logging
import sys

import apache_beam as beam
from absl import app, flags
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from etils import epath

from data import cleaning, dedup, prepare_io, tokenizers
from data import prepare_report as report_lib
from data.prepare_report import event

EVENTS = 'events'
TOKENIZER_FILES = {'sentencepiece': 'tokenizer.model', 'bpe': 'tokenizer.json'}  # tokenizers.train


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything `prepare` takes besides input and output; each is also a flag of the same name."""
  text_key: str = cleaning.flag_field(
      'text', 'the text field of .jsonl records and column of .parquet files')
  workers: int = cleaning.flag_field(1, 'DirectRunner worker processes (direct_num_workers)')
  tokenizer: str = cleaning.flag_field('bytes', 'bytes, sentencepiece or bpe (trained on a sample)')
  vocab_size: int = cleaning.flag_field(8192, 'vocabulary size of a trained tokenizer')
  tokenizer_sample_docs: int = cleaning.flag_field(5000, 'kept documents the tokenizer learns from')
  eval_percent: int = cleaning.flag_field(
      1, 'percent of documents (by content hash) in the eval split')
  num_shards: int = cleaning.flag_field(8, 'train ArrayRecord files')
  num_eval_shards: int = cleaning.flag_field(1, 'eval ArrayRecord files')
  scrub_pii: bool = cleaning.flag_field(False, 'replace e-mail and IP addresses by placeholders')
  near_dup_threshold: float = cleaning.flag_field(
      0.8, 'Jaccard similarity at which documents are near copies')
  num_perm: int = cleaning.flag_field(128, 'MinHash permutations')
  shingle_words: int = cleaning.flag_field(5, 'words per MinHash shingle')
  rules: cleaning.Rules = dataclasses.field(default_factory=cleaning.Rules)

  def validate(self):
    """One-line ValueErrors, each starting with the option's name."""
    checks = (
        ('tokenizer', self.tokenizer in ('bytes',) + tokenizers.KINDS,
         f'{self.tokenizer!r} is not bytes, {" or ".join(tokenizers.KINDS)}'),
        ('workers', self.workers >= 1, f'{self.workers} is not a positive number'),
        ('vocab_size', self.vocab_size >= 64, f'{self.vocab_size} is below 64'),
        ('tokenizer_sample_docs', self.tokenizer_sample_docs >= 1, 'must be positive'),
        ('eval_percent', 0 <= self.eval_percent < 100, f'{self.eval_percent} is not in [0, 100)'),
        ('num_shards', self.num_shards >= 1, f'{self.num_shards} is not a positive number'),
        ('num_eval_shards', self.num_eval_shards >= 1, f'{self.num_eval_shards} is not positive'),
        ('near_dup_threshold', 0 < self.near_dup_threshold <= 1,
         f'{self.near_dup_threshold} is not in (0, 1]'),
        ('num_perm', self.num_perm >= 2, f'{self.num_perm} is below 2'),
        ('shingle_words', self.shingle_words >= 1, f'{self.shingle_words} is not positive'))
    for name, ok, what in checks + tuple(_rule_checks(self.rules)):
      if not ok:
        raise ValueError(f'{name}: {what}')
    try:
      dedup.lsh_bands(self.near_dup_threshold, self.num_perm)
    except ValueError as e:  # e.g. a threshold so near 1 that one band would do
      raise ValueError(f'near_dup_threshold: {self.near_dup_threshold} with num_perm='
                       f'{self.num_perm} gives no LSH banding ({e})') from None


def _rule_checks(rules):
  for field in dataclasses.fields(rules):
    value = getattr(rules, field.name)
    if field.name.endswith('_ratio'):
      yield field.name, 0 <= value <= 1, f'{value} is not in [0, 1]'
    else:
      yield field.name, value >= 1, f'{value} is not a positive number'


@beam.typehints.with_output_types(tuple[str, str])  # the main output; events are tagged
class _Clean(beam.DoFn):
  """(source, text) -> (content hash, normalised text) if it passes the rules; events always."""

  def __init__(self, rules: cleaning.Rules, scrub_pii: bool):
    self._rules, self._scrub_pii = rules, scrub_pii

  def process(self, element):
    _, raw = element
    yield beam.pvalue.TaggedOutput(EVENTS, event('documents_in'))
    yield beam.pvalue.TaggedOutput(EVENTS, event('bytes_in', len(raw.encode('utf-8'))))
    yield beam.pvalue.TaggedOutput(EVENTS, report_lib.histogram_event('chars_in', len(raw)))
    text = cleaning.normalise(raw)
    if self._scrub_pii:
      text, counts = cleaning.scrub_pii(text)
      for kind, count in counts.items():
        yield beam.pvalue.TaggedOutput(EVENTS, event(f'pii/{kind}', count))
    rule = cleaning.failed_rule(text, self._rules)
    if rule:
      yield beam.pvalue.TaggedOutput(EVENTS, event(f'dropped/{rule}', 1, text))
      return
    yield beam.pvalue.TaggedOutput(EVENTS, event('passed_rules'))
    yield dedup.content_hash(text), text


def _exact_events(element):
  _, _, copies = element
  if copies:
    yield event('exact_dup/clusters')
    yield event('exact_dup/documents', copies)


def _not_near_copy(group):
  key, found = group
  if found['representative']:
    return
  for text in found['text']:
    yield key, text


def _kept_events(element):
  _, text = element
  yield event('documents_out')
  yield event('bytes_out', len(text.encode('utf-8')))
  yield report_lib.histogram_event('chars_out', len(text))


def _clean_pipeline(p, files: list[str], o: Options, out: str):
  """Writes the kept documents (docs-*.jsonl), the tokenizer sample and the events to `out`."""
  read = (p | 'Files' >> beam.Create(files) | 'SpreadFiles' >> beam.Reshuffle()
          | 'Read' >> beam.ParDo(prepare_io.ReadDocuments(o.text_key)).with_outputs(
              EVENTS, main='docs'))
  cleaned = (read.docs | 'SpreadDocs' >> beam.Reshuffle()
             | 'Clean' >> beam.ParDo(_Clean(o.rules, o.scrub_pii)).with_outputs(
                 EVENTS, main='docs'))
  exact = cleaned.docs | 'Exact' >> dedup.ExactDuplicates()
  unique = exact | 'Unique' >> beam.Map(lambda e: (e[0], e[1]))
  near = unique | 'Near' >> dedup.NearDuplicates(o.near_dup_threshold, o.num_perm,
                                                  o.shingle_words)
  kept = ({'text': unique, 'representative': near} | 'JoinNear' >> beam.CoGroupByKey()
          | 'Kept' >> beam.FlatMap(_not_near_copy))
  events = (read[EVENTS], cleaned[EVENTS],
            exact | 'ExactEvents' >> beam.FlatMap(_exact_events),
            near | 'NearEvents' >> beam.Map(lambda _: event('near_dup/documents')),
            near | 'Representatives' >> beam.Values() | 'DistinctReps' >> beam.Distinct()
            | 'ClusterEvents' >> beam.Map(lambda _: event('near_dup/clusters')),
            kept | 'KeptEvents' >> beam.FlatMap(_kept_events))
  _ = events | 'AllEvents' >> beam.Flatten() | 'WriteEvents' >> report_lib.WriteEvents(out)
  _ = (kept | 'DocsJson' >> beam.Map(json.dumps)
       | 'WriteDocs' >> beam.io.WriteToText(f'{out}/docs', '.jsonl'))
  _ = (kept | 'Sample' >> beam.combiners.Top.Of(o.tokenizer_sample_docs, key=lambda kv: kv[0],
                                                reverse=True)
       | 'SampleTexts' >> beam.FlatMap(lambda docs: [json.dumps(t) for _, t in sorted(docs)])
       | 'WriteSample' >> beam.io.WriteToText(f'{out}/sample', '.jsonl', num_shards=1,
                                              shard_name_template=''))


def _shards_pipeline(p, clean_dir: str, spec: str, split_shards: dict[str, int],
                     eval_percent: int, output: str, out: str):
  """Tokenises the kept documents into the train and eval ArrayRecord files in `output`."""
  tokenised = (p | 'ReadDocs' >> beam.io.ReadFromText(f'{clean_dir}/docs*.jsonl')
               | 'Parse' >> beam.Map(json.loads)
               | 'Tokenise' >> beam.ParDo(prepare_io.Tokenise(spec, eval_percent,
                                                              split_shards)).with_outputs(
                                                                  EVENTS, main='records'))
  _ = (tokenised.records | 'GroupShards' >> beam.GroupByKey()
       | 'WriteShards' >> beam.Map(prepare_io.write_shard, output, split_shards))
  _ = tokenised[EVENTS] | 'WriteEvents' >> report_lib.WriteEvents(out)


def _make_shards(o: Options, clean_dir: str, spec: str, out: epath.Path, stage_dir: str,
                 beam_options: PipelineOptions):
  split_shards = {'train': o.num_shards, 'eval': o.num_eval_shards}
  prepare_io.remove_shards(out)
  _run_beam(lambda p: _shards_pipeline(p, clean_dir, spec, split_shards, o.eval_percent, str(out),
                                       stage_dir), beam_options, 'shards')
  prepare_io.add_empty_shards(out, split_shards)  # a shard no document hashed to


def _pipeline_options(o: Options, pipeline_args) -> PipelineOptions:
  """Beam's options; with no --runner, the FnApiRunner: the DirectRunner's own batch engine,
  without its first try of the Prism runner, which downloads a binary (and then falls back)."""
  args = list(pipeline_args)
  if PipelineOptions(args).view_as(StandardOptions).runner is None:
    args.append('--runner=FnApiRunner')
  if o.workers > 1:
    args += [f'--direct_num_workers={o.workers}', '--direct_running_mode=multi_processing']
  return PipelineOptions(args)


def _run_beam(build, options: PipelineOptions, stage: str):
  with beam.Pipeline(options=options) as p:
    build(p)
  result = p.result
  counters = result.metrics().query()['counters']
  for counter in sorted(counters, key=lambda c: c.key.metric.name):
    logging.info('%s: %s = %s', stage, counter.key.metric.name, counter.committed)


def _stage(output: epath.Path, name: str, key: str, run) -> str:
  """Runs `run(stage_dir)` unless the stage's `_DONE` marker holds `key`; 'ran' or 'skipped'."""
  directory = output / '_work' / name
  marker = directory / '_DONE'
  if marker.exists() and marker.read_text() == key:
    logging.info('stage %s: already done with these arguments and inputs, skipping', name)
    return 'skipped'
  if directory.exists():
    directory.rmtree()
  directory.mkdir(parents=True)
  logging.info('stage %s: running', name)
  run(str(directory))
  marker.write_text(key)
  logging.info('stage %s: done', name)
  return 'ran'


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _train_tokenizer(o: Options, clean_dir: str, output: epath.Path) -> None:
  for name in TOKENIZER_FILES.values():
    (output / name).unlink(missing_ok=True)
  if o.tokenizer == 'bytes':
    return
  with (epath.Path(clean_dir) / 'sample.jsonl').open() as f:
    texts = [json.loads(line) for line in f]
  if not texts:
    raise ValueError('tokenizer: no documents were kept to train it on')
  tokenizers.train(texts, o.tokenizer, o.vocab_size, str(output))


def prepare(input: str, output: str, pipeline_args=(), **options) -> dict:  # pylint: disable=redefined-builtin
  """Runs the pipeline (skipping the stages already done) and returns the report dict.

  `options` are the fields of `Options`; `pipeline_args` go to Beam's PipelineOptions."""
  o = Options(**options)
  o.validate()
  files = prepare_io.input_files(input, o.text_key)
  out = epath.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  beam_options = _pipeline_options(o, pipeline_args)
  clean_args = dataclasses.asdict(o)  # the sample for the tokenizer is drawn here too
  for name in ('workers', 'tokenizer', 'vocab_size', 'eval_percent', 'num_shards',
               'num_eval_shards'):
    clean_args.pop(name)
  clean_key = _key(prepare_io.fingerprint(files), clean_args)
  tokenizer_key = _key(clean_key, o.tokenizer, o.vocab_size)
  shards_key = _key(tokenizer_key, o.eval_percent, o.num_shards, o.num_eval_shards)
  clean_dir, shards_dir = str(out / '_work' / 'clean'), str(out / '_work' / 'shards')
  stages = {'clean': _stage(out, 'clean', clean_key, lambda d: _run_beam(
      lambda p: _clean_pipeline(p, files, o, d), beam_options, 'clean'))}
  stages['tokenizer'] = _stage(out, 'tokenizer', tokenizer_key,
                               lambda d: _train_tokenizer(o, clean_dir, out))
  spec = str(out / TOKENIZER_FILES[o.tokenizer]) if o.tokenizer in TOKENIZER_FILES else 'bytes'
  stages['shards'] = _stage(out, 'shards', shards_key,
                            lambda d: _make_shards(o, clean_dir, spec, out, d, beam_options))
  sums = report_lib.read_events(clean_dir, shards_dir)
  report = report_lib.build(sums, cleaning.RULE_NAMES, o.near_dup_threshold)
  report['stages'] = stages
  prepare_io.write_dataset_json(out, spec, report['splits'], o, input)
  (out / 'report.json').write_text(json.dumps(report, indent=1))
  report_lib.plot(report, str(out / 'report'))
  return report


def _define_flags():
  flags.DEFINE_string('input', None, 'files to read: a glob (`**` for any depth), local or gs://')
  flags.DEFINE_string('output', None, 'the prepared dataset directory, local or gs://')
  for field in dataclasses.fields(Options) + dataclasses.fields(cleaning.Rules):
    if field.name == 'rules':
      continue
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[type(field.default)]
    define(field.name, field.default, field.metadata['help'])


def main(argv):
  """Arguments after `--` go to Beam's PipelineOptions (runner, project, ...)."""
  values = {name: flags.FLAGS[name].value for name in flags.FLAGS}
  rules = cleaning.Rules(**{f.name: values[f.name] for f in dataclasses.fields(cleaning.Rules)})
  options = {f.name: values[f.name] for f in dataclasses.fields(Options) if f.name != 'rules'}
  logging.getLogger().setLevel(logging.INFO)
  try:
    if not flags.FLAGS.input or not flags.FLAGS.output:
      raise ValueError(f'{"input" if not flags.FLAGS.input else "output"}: the flag is required')
    report = prepare(flags.FLAGS.input, flags.FLAGS.output, argv[1:], rules=rules, **options)
  except ValueError as e:
    sys.stderr.write(f'prepare: error: {" ".join(str(e).split())}\n')
    sys.exit(2)
  print(f'{report["documents_in"]} documents in, {report["documents_out"]} out; '
        f'{flags.FLAGS.output}/report.json has the details')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
