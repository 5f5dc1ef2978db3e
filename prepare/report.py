"""The quality report of `python -m prepare`: events counted in the pipeline, then report.json
and plots.

An event is `(name, count, example or None)`, e.g. `('dropped/min_chars', 1, 'def f')`. The
pipeline sums them per name (keeping a few examples, the same ones whatever the element order)
and writes the sums beside each stage's outputs; the report is built from those files, so a
rerun that skips a stage still reports it.
"""

import json

import apache_beam as beam
from etils import epath

EXAMPLES = 3  # examples kept per event name
EXAMPLE_CHARS = 160


def event(name: str, count: int = 1, example: str | None = None) -> tuple:
  if example is not None and len(example) > EXAMPLE_CHARS:
    example = example[:EXAMPLE_CHARS] + '...'
  return name, count, example


def histogram_event(kind: str, value: int) -> tuple:
  """One value counted in a power-of-two bin: bin b holds values in [b, 2b) (and 0 holds 0)."""
  return event(f'hist/{kind}/{1 << (value.bit_length() - 1) if value > 0 else 0}')


class SumEvents(beam.CombineFn):
  """Events -> {name: [count, sorted examples]}."""

  def create_accumulator(self):
    return {}

  def add_input(self, sums, element):
    name, count, example = element
    entry = sums.setdefault(name, [0, []])
    entry[0] += count
    if example is not None and example not in entry[1]:
      entry[1] = sorted(entry[1] + [example])[:EXAMPLES]
    return sums

  def merge_accumulators(self, accumulators):
    merged = {}
    for sums in accumulators:
      for name, (count, examples) in sums.items():
        entry = merged.setdefault(name, [0, []])
        entry[0] += count
        entry[1] = sorted(set(entry[1] + examples))[:EXAMPLES]
    return merged

  def extract_output(self, sums):
    return sums


def _tick(element):
  """Beam counters show progress while the pipeline runs and are printed when it ends."""
  name = element[0]
  if not name.startswith('hist/'):
    beam.metrics.Metrics.counter('prepare', name).inc(element[1])
  return element


class WriteEvents(beam.PTransform):
  """Events -> `<directory>/events.json`, one JSON object of sums."""

  def __init__(self, directory: str):
    super().__init__()
    self._directory = directory

  def expand(self, events):
    return (events
            | 'Tick' >> beam.Map(_tick)
            | 'Sum' >> beam.CombineGlobally(SumEvents())
            | 'Json' >> beam.Map(lambda sums: json.dumps(sums, sort_keys=True))
            | 'Write' >> beam.io.WriteToText(f'{self._directory}/events', '.json', num_shards=1,
                                             shard_name_template=''))


def read_events(*directories: str) -> dict:
  sums = {}
  for directory in directories:
    sums.update(json.loads((epath.Path(directory) / 'events.json').read_text()))
  return sums


def _count(sums, name):
  return sums.get(name, [0, []])[0]


def _grouped(sums, prefix, names=()):
  """{suffix: {'count', 'examples'}} for the events under `prefix/`, listing `names` even at 0."""
  out = {name: {'count': 0, 'examples': []} for name in names}
  for name, (count, examples) in sums.items():
    if name.startswith(prefix + '/'):
      out[name[len(prefix) + 1:]] = {'count': count, 'examples': examples}
  return dict(sorted(out.items()))


def _histogram(sums, kind):
  bins = {int(name.split('/')[-1]): count for name, (count, _) in sums.items()
          if name.startswith(f'hist/{kind}/')}
  return {str(b): bins[b] for b in sorted(bins)}


def build(sums: dict, rule_names, near_dup_threshold: float) -> dict:
  """The report as a dict (what report.json holds)."""
  passed = _count(sums, 'passed_rules')
  unique = passed - _count(sums, 'exact_dup/documents')
  return {
      'documents_in': _count(sums, 'documents_in'), 'bytes_in': _count(sums, 'bytes_in'),
      'documents_out': _count(sums, 'documents_out'), 'bytes_out': _count(sums, 'bytes_out'),
      'malformed': _grouped(sums, 'malformed'),
      'dropped': _grouped(sums, 'dropped', rule_names),
      'pii_scrubbed': {k: v['count'] for k, v in _grouped(sums, 'pii', ('email', 'ip')).items()},
      'exact_duplicates': {
          'clusters': _count(sums, 'exact_dup/clusters'),
          'documents_dropped': _count(sums, 'exact_dup/documents'),
          'rate': _count(sums, 'exact_dup/documents') / passed if passed else 0.0},
      'near_duplicates': {
          'threshold': near_dup_threshold,
          'clusters': _count(sums, 'near_dup/clusters'),
          'documents_dropped': _count(sums, 'near_dup/documents'),
          'rate': _count(sums, 'near_dup/documents') / unique if unique else 0.0},
      'splits': {split: {'documents': _count(sums, f'split/{split}/documents'),
                         'tokens': _count(sums, f'split/{split}/tokens')}
                 for split in ('train', 'eval', 'test')
                 if split != 'test' or _count(sums, 'split/test/documents')},
      'histograms': {kind: _histogram(sums, kind) for kind in ('chars_in', 'chars_out', 'tokens')},
  }


def plot(report: dict, directory: str):
  """report/<histogram>.png for each histogram and report/dropped.png (matplotlib, Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top; only the report needs it
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  dropped = {**{f'rule: {k}': v['count'] for k, v in report['dropped'].items()},
             'exact duplicate': report['exact_duplicates']['documents_dropped'],
             'near duplicate': report['near_duplicates']['documents_dropped'],
             'malformed': sum(v['count'] for v in report['malformed'].values())}
  charts = {name: (f'{name.replace("_", " ")} per document', 'lower edge of a power-of-two bin',
                   hist) for name, hist in report['histograms'].items()}
  charts['dropped'] = ('documents dropped, by reason', '', dropped)
  for name, (title, xlabel, values) in charts.items():
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), list(values), rotation=60, ha='right', fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('documents')
    fig.tight_layout()
    with (out / f'{name}.png').open('wb') as f:
      fig.savefig(f, format='png')
    plt.close(fig)
