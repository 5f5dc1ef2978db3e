"""The Apache Beam pipeline of `python -m prepare` (prepare/command.py: the command, its options).

`run(input, output, options)` reads the files, cleans and deduplicates the documents, trains the
tokenizer and writes the shards, `dataset.json` and the report. Three stages (clean, tokenizer,
shards) each finish with a `_DONE` marker under `DIR/_work/` holding a hash of their arguments
and the input files' names, sizes and times; a rerun skips the stages whose hash matches and
redoes the rest. `dataset.json` and `report.json` are removed first and written last, so a run
that fails or refuses its input leaves no directory that training would take for a dataset.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.transforms import environments
from etils import epath

from data import tokenizers
from prepare import cleaning, dedup, storage
from prepare import report as report_lib
from prepare.report import event

EVENTS = 'events'
TOKENIZER_FILES = {'sentencepiece': 'tokenizer.model', 'bpe': 'tokenizer.json'}  # tokenizers.train


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


def _clean_pipeline(p, files: list[str], o, out: str):
  """Writes the kept documents (docs-*.jsonl), the tokenizer sample and the events to `out`."""
  read = (p | 'Files' >> beam.Create(files) | 'SpreadFiles' >> beam.Reshuffle()
          | 'Read' >> beam.ParDo(storage.ReadDocuments(o.text_key, o.scrub_pii)).with_outputs(
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
                     percents: tuple[int, int], output: str, out: str):
  """Tokenises the kept documents into the train, eval (and test) ArrayRecord files in
  `output`; `percents`: (eval_percent, test_percent)."""
  eval_percent, test_percent = percents
  docs = p | 'ReadDocs' >> beam.io.ReadFromText(f'{clean_dir}/docs*.jsonl') | 'Parse' >> beam.Map(
      json.loads)
  moved = (docs | 'Hashes' >> beam.Map(lambda doc: doc[0])
           | 'NoEmptySplit' >> beam.CombineGlobally(storage.NoEmptySplit(eval_percent)))
  tokenised = docs | 'Tokenise' >> beam.ParDo(
      storage.Tokenise(spec, eval_percent, split_shards, test_percent),
      beam.pvalue.AsSingleton(moved)).with_outputs(EVENTS, main='records')
  _ = (tokenised.records | 'GroupShards' >> beam.GroupByKey()
       | 'WriteShards' >> beam.Map(storage.write_shard, output, split_shards))
  _ = tokenised[EVENTS] | 'WriteEvents' >> report_lib.WriteEvents(out)


def _make_shards(o, clean_dir: str, spec: str, out: epath.Path, stage_dir: str, pipeline_args):
  split_shards = {'train': o.num_shards, 'eval': o.num_eval_shards,
                  **({'test': o.num_test_shards} if o.test_percent else {})}
  storage.remove_shards(out)
  _run_beam(lambda p: _shards_pipeline(p, clean_dir, spec, split_shards,
                                       (o.eval_percent, o.test_percent), str(out), stage_dir),
            o, pipeline_args, stage_dir)
  storage.add_empty_shards(out, split_shards)  # a shard no document hashed to


def _runner_and_options(o, pipeline_args, stage_dir: str):
  """Beam's runner and options. With no --runner, the FnApiRunner: the DirectRunner's own batch
  engine, without its first try of the Prism runner, which downloads a binary (and then falls
  back). `--workers=N` > 1 runs it on N worker processes (Beam's own command for them) whose
  stderr, Beam's start-up and progress logs, goes to `<stage>/workers.log`: their failures
  still reach this process and end the run."""
  args = list(pipeline_args)
  if PipelineOptions(args).view_as(StandardOptions).runner is not None:  # e.g. DirectRunner
    if o.workers > 1:
      args += [f'--direct_num_workers={o.workers}', '--direct_running_mode=multi_processing']
    return None, PipelineOptions(args)
  if o.workers == 1:
    return fn_runner.FnApiRunner(), PipelineOptions(args)
  log = f'{stage_dir}/workers.log' if '://' not in stage_dir else os.devnull
  command = (f'{shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main '
             f'2>>{shlex.quote(log)}')
  workers = environments.SubprocessSDKEnvironment.from_command_string(command)
  return (fn_runner.FnApiRunner(default_environment=workers),
          PipelineOptions(args + [f'--direct_num_workers={o.workers}']))


def _run_beam(build, o, pipeline_args, stage_dir: str):
  runner, options = _runner_and_options(o, pipeline_args, stage_dir)
  with beam.Pipeline(runner=runner, options=options) as p:
    build(p)
  counters = p.result.metrics().query()['counters']
  for counter in sorted(counters, key=lambda c: c.key.metric.name):
    logging.info('%s: %s = %s', stage_dir, counter.key.metric.name, counter.committed)


def _stage(output: epath.Path, name: str, key: str, run_stage) -> str:
  """Runs `run_stage(stage_dir)` unless the stage's `_DONE` marker holds `key`; 'ran' or
  'skipped'. A line on stderr says which (podium's own progress: a stage may take hours)."""
  directory = output / '_work' / name
  marker = directory / '_DONE'
  if marker.exists() and marker.read_text() == key:
    print(f'prepare: stage {name}: done before with these arguments and inputs, skipped',
          file=sys.stderr, flush=True)
    return 'skipped'
  if directory.exists():
    directory.rmtree()
  directory.mkdir(parents=True)
  print(f'prepare: stage {name}: running', file=sys.stderr, flush=True)
  run_stage(str(directory))
  marker.write_text(key)
  return 'ran'


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _train_tokenizer(o, clean_dir: str, output: epath.Path) -> None:
  for name in TOKENIZER_FILES.values():
    (output / name).unlink(missing_ok=True)
  if o.tokenizer == 'bytes':
    return
  with (epath.Path(clean_dir) / 'sample.jsonl').open() as f:
    texts = [json.loads(line) for line in f]
  tokenizers.train(texts, o.tokenizer, o.vocab_size, str(output))


def _check_banding(o):
  try:
    dedup.lsh_bands(o.near_dup_threshold, o.num_perm)
  except ValueError as e:  # e.g. a threshold so near 1 that one band would do
    raise ValueError(f'near_dup_threshold: {o.near_dup_threshold} with num_perm='
                     f'{o.num_perm} gives no LSH banding ({e})') from None


def _output_dir(output: str) -> epath.Path:
  """`output` as a directory this process can write, or a one-line ValueError."""
  out = epath.Path(output)
  if out.exists() and not out.is_dir():
    raise ValueError(f'output: {output} is a file; name a directory')
  try:
    out.mkdir(parents=True, exist_ok=True)
    (out / '_work').mkdir(exist_ok=True)
    probe = out / '_work' / '.writable'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'output: cannot write the directory {output}: {e.strerror or e}') from None
  return out


def _refuse_unusable(report: dict, eval_percent: int):
  """A one-line ValueError when the kept documents cannot make a dataset with its splits."""
  if report['documents_out'] == 1 and eval_percent:
    raise ValueError('eval_percent: 1 document kept, too few for a train and an eval split; '
                     'give more documents, or --eval_percent=0 for no eval split')
  if report['documents_out']:
    return
  dropped = sorted(((v['count'], rule) for rule, v in report['dropped'].items() if v['count']),
                   reverse=True)
  why = (f'0 of {report["documents_in"]} documents kept: '
         + ', '.join(f'{count} dropped by {rule}' for count, rule in dropped)
         + '; see ' + ', '.join(f'--{rule}' for _, rule in dropped)
         if dropped else 'the files hold no documents')
  malformed = {kind: v['count'] for kind, v in report['malformed'].items()}
  if malformed:
    why += '; malformed records skipped: ' + ', '.join(
        f'{count} {kind}' for kind, count in malformed.items())
  raise ValueError(f'input: {why}')


def run(input: str, output: str, o, pipeline_args=()) -> dict:  # pylint: disable=redefined-builtin
  """Runs the pipeline (skipping the stages already done) and returns the report dict.

  `o` is a `prepare.command.Options`; `pipeline_args` go to Beam's PipelineOptions. Bad input or
  options, and input that leaves too few documents, raise a one-line ValueError."""
  o.validate()
  _check_banding(o)
  files = storage.input_files(input, o.text_key)
  out = _output_dir(output)
  for name in ('dataset.json', 'report.json'):  # written last: the signs of a finished run
    (out / name).unlink(missing_ok=True)
  clean_args = dataclasses.asdict(o)  # the sample for the tokenizer is drawn here too
  for name in ('workers', 'tokenizer', 'vocab_size', 'eval_percent', 'num_shards',
               'num_eval_shards', 'test_percent', 'num_test_shards'):
    clean_args.pop(name)
  clean_key = _key(storage.fingerprint(files), clean_args)
  tokenizer_key = _key(clean_key, o.tokenizer, o.vocab_size)
  shards_key = _key(tokenizer_key, o.eval_percent, o.num_shards, o.num_eval_shards,
                    o.test_percent, o.num_test_shards)
  clean_dir, shards_dir = str(out / '_work' / 'clean'), str(out / '_work' / 'shards')
  stages = {'clean': _stage(out, 'clean', clean_key, lambda d: _run_beam(
      lambda p: _clean_pipeline(p, files, o, d), o, pipeline_args, d))}
  _refuse_unusable(_report(o, clean_dir), o.eval_percent)
  stages['tokenizer'] = _stage(out, 'tokenizer', tokenizer_key,
                               lambda d: _train_tokenizer(o, clean_dir, out))
  spec = str(out / TOKENIZER_FILES[o.tokenizer]) if o.tokenizer in TOKENIZER_FILES else 'bytes'
  stages['shards'] = _stage(out, 'shards', shards_key,
                            lambda d: _make_shards(o, clean_dir, spec, out, d, pipeline_args))
  report = {**_report(o, clean_dir, shards_dir), 'stages': stages}
  (out / 'report.json').write_text(json.dumps(report, indent=1))
  report_lib.plot(report, str(out / 'report'))
  storage.write_dataset_json(out, spec, report['splits'], o, input)
  return report


def _report(o, *stage_dirs: str) -> dict:
  sums = report_lib.read_events(*stage_dirs)
  return report_lib.build(sums, cleaning.RULE_NAMES, o.near_dup_threshold)
