"""The command of `python -m prepare` (prepare/__main__.py, whose docstring is its usage): its
options and flags, quiet logs, and one-line errors."""

import dataclasses

from absl import flags

from data import tokenizers
from hardware import console, paths
from prepare import cleaning


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
      1, 'percent of documents (by content hash) in the eval split; at least one document '
      'whenever 2 or more are kept (0: no eval split)')
  test_percent: int = cleaning.flag_field(
      0, 'percent of documents (by content hash, from the other end) in the test split, which '
      'a training run evaluates once at the end (0: no test split)')
  num_shards: int = cleaning.flag_field(8, 'train ArrayRecord files')
  num_eval_shards: int = cleaning.flag_field(1, 'eval ArrayRecord files')
  num_test_shards: int = cleaning.flag_field(1, 'test ArrayRecord files')
  scrub_pii: bool = cleaning.flag_field(
      False, 'replace e-mail and IP addresses by placeholders, in the text and in the report')
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
        ('test_percent', 0 <= self.test_percent < 100 - self.eval_percent,
         f'{self.test_percent} is not in [0, 100 - eval_percent)'),
        ('num_shards', self.num_shards >= 1, f'{self.num_shards} is not a positive number'),
        ('num_eval_shards', self.num_eval_shards >= 1, f'{self.num_eval_shards} is not positive'),
        ('num_test_shards', self.num_test_shards >= 1, f'{self.num_test_shards} is not positive'),
        ('near_dup_threshold', 0 < self.near_dup_threshold <= 1,
         f'{self.near_dup_threshold} is not in (0, 1]'),
        ('num_perm', self.num_perm >= 2, f'{self.num_perm} is below 2'),
        ('shingle_words', self.shingle_words >= 1, f'{self.shingle_words} is not positive'))
    for name, ok, what in checks + tuple(_rule_checks(self.rules)):
      if not ok:
        raise ValueError(f'{name}: {what}')


def _rule_checks(rules):
  for field in dataclasses.fields(rules):
    value = getattr(rules, field.name)
    if field.name.endswith('_ratio'):
      yield field.name, 0 <= value <= 1, f'{value} is not in [0, 1]'
    else:
      yield field.name, value >= 1, f'{value} is not a positive number'


def define_flags():
  """--input, --output and a flag per option; prepare/__main__.py makes them its key flags, the
  ones its --help lists."""
  flags.DEFINE_string('input', None, 'files to read: a glob (`**` for any depth), local or gs://')
  flags.DEFINE_string('output', None, 'the prepared dataset directory, local or gs://')
  for field in dataclasses.fields(Options) + dataclasses.fields(cleaning.Rules):
    if field.name == 'rules':
      continue
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[type(field.default)]
    define(field.name, field.default, field.metadata['help'])


def _options() -> Options:
  values = {name: flags.FLAGS[name].value for name in flags.FLAGS}
  rules = cleaning.Rules(**{f.name: values[f.name] for f in dataclasses.fields(cleaning.Rules)})
  return Options(rules=rules, **{f.name: values[f.name] for f in dataclasses.fields(Options)
                                 if f.name != 'rules'})


def _summary(report: dict, output: str) -> str:
  """The last line: documents in and kept, and the split sizes."""
  sizes = ', '.join(f'{split} {n["documents"]} ({n["tokens"]:,} tokens)'
                    for split, n in report['splits'].items())
  return (f'{report["documents_in"]} documents in, {report["documents_out"]} kept: {sizes}; '
          f'{output}/report.json has the details')


def main(argv):
  """Arguments after `--` go to Beam's PipelineOptions (runner, project, ...)."""
  console.quiet_libraries(console.verbose())
  try:
    for name in ('input', 'output'):
      if not flags.FLAGS[name].value:
        raise ValueError(f'{name}: the flag is required')
    options = _options()
    options.validate()
  except ValueError as e:
    console.usage_error(e)
  for module in ('apache_beam', 'datasketch'):
    console.require(module, 'prepare', 'python -m prepare')
  from prepare import pipeline  # pylint: disable=g-import-not-at-top; the extra, checked
  try:
    report = pipeline.run(paths.absolute(flags.FLAGS.input), paths.absolute(flags.FLAGS.output),
                          options, argv[1:])
  except ValueError as e:
    console.usage_error(e)
  print(_summary(report, flags.FLAGS.output))
