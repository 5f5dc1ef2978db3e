"""Precision and recall of `python -m prepare`'s duplicate detection.

`python benchmarks/dedup_quality.py`

Plants clusters in the standard library's .py files (those of 2 KB or more): for some files,
1-3 near copies (1-5 words edited) and sometimes an exact copy. Runs exact dedup (content
hash) and `prepare.dedup.NearDuplicates` in a Beam pipeline, then compares the pairs it puts in
one cluster with the planted pairs. A flagged pair that was not planted but whose shingle
Jaccard similarity really reaches the threshold (the standard library has its own near copies)
counts as correct in `precision`; `precision_planted_only` counts it as wrong. Targets:
precision >= 0.95, recall >= 0.90. Prints figures only; asserts nothing.
"""

import collections
import glob
import itertools
import json
import os
import random
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import apache_beam as beam  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks.prepare_throughput import near_copy  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from prepare import cleaning, dedup  # pylint: disable=g-import-not-at-top,wrong-import-position

_CLUSTERS = flags.DEFINE_integer('clusters', 300, 'originals given planted copies')
_THRESHOLD = flags.DEFINE_float('threshold', 0.8, 'near-duplicate Jaccard threshold')
_SHINGLE_WORDS = 5


def _corpus(clusters: int):
  """(name, normalised text) documents and the planted clusters (lists of names)."""
  rng = random.Random(0)
  files = [f for f in sources.stdlib_files() if os.path.getsize(f) >= 2048]
  texts = {f'{i}': cleaning.normalise(open(f, encoding='utf-8', errors='replace').read())
           for i, f in enumerate(files)}
  planted = []
  for name in rng.sample(sorted(texts), clusters):
    members = [name]
    for k in range(rng.randint(1, 3)):
      members.append(f'{name}.near{k}')
      texts[members[-1]] = near_copy(texts[name], rng, rng.randint(1, 5))
    if rng.random() < 0.3:
      members.append(f'{name}.exact')
      texts[members[-1]] = texts[name]
    planted.append(members)
  return texts, planted


def _flagged_clusters(texts: dict[str, str], threshold: float) -> list[list[str]]:
  """What the pipeline groups: exact copies by hash, then near copies among the distinct texts."""
  by_hash = collections.defaultdict(list)
  for name, text in texts.items():
    by_hash[dedup.content_hash(text)].append(name)
  with tempfile.TemporaryDirectory() as tmp:
    with beam.Pipeline(runner='FnApiRunner') as p:
      _ = (p | beam.Create([(h, texts[names[0]]) for h, names in by_hash.items()])
           | dedup.NearDuplicates(threshold, num_perm=128, shingle_words=_SHINGLE_WORDS)
           | beam.Map(json.dumps) | beam.io.WriteToText(f'{tmp}/near'))
    representative = dict(json.loads(line) for path in glob.glob(f'{tmp}/near*')
                          for line in open(path))
  groups = collections.defaultdict(list)
  for h, names in by_hash.items():
    groups[representative.get(h, h)] += names
  return [g for g in groups.values() if len(g) > 1]


def _pairs(clusters) -> set[tuple[str, str]]:
  return {tuple(sorted(p)) for c in clusters for p in itertools.combinations(c, 2)}


def _jaccard(a: str, b: str) -> float:
  sa, sb = dedup.shingles(a, _SHINGLE_WORDS), dedup.shingles(b, _SHINGLE_WORDS)
  return len(sa & sb) / len(sa | sb)


def main(_):
  texts, planted = _corpus(_CLUSTERS.value)
  flagged, truth = _pairs(_flagged_clusters(texts, _THRESHOLD.value)), _pairs(planted)
  unplanted = flagged - truth
  really_similar = {p for p in unplanted if _jaccard(texts[p[0]], texts[p[1]]) >= _THRESHOLD.value}
  print(f'{len(texts)} documents, {len(planted)} planted clusters, {len(truth)} planted pairs, '
        f'{len(flagged)} flagged pairs ({len(unplanted)} not planted, {len(really_similar)} of '
        f'them with Jaccard >= {_THRESHOLD.value})')
  print(f'precision {(len(flagged & truth) + len(really_similar)) / len(flagged):.4f} '
        f'precision_planted_only {len(flagged & truth) / len(flagged):.4f} '
        f'recall {len(flagged & truth) / len(truth):.4f}')


if __name__ == '__main__':
  app.run(main)
