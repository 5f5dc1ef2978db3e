"""Exact and near-duplicate detection as Beam transforms over `(content hash, text)` pairs.

Near duplicates: a MinHash signature of each document's word shingles (datasketch), split into
LSH bands; documents that share a band key meet in one GroupByKey group, where their pairs are
verified against the Jaccard threshold on the full signatures. Only the verified pairs, not the
documents, then go to one worker, which joins them into clusters (union-find) and keeps the
member with the smallest content hash, so the result does not depend on element order.
"""

import hashlib
import zlib

import apache_beam as beam
import datasketch
import numpy as np

_SEED = 1  # MinHash permutations: fixed, so signatures agree across workers and reruns


def content_hash(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band) that datasketch picks for `threshold`, balancing misses and noise."""
  lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


def shingles(text: str, words: int) -> set[bytes]:
  """The document's word n-grams (the whole text when it has fewer words)."""
  tokens = text.split()
  return {' '.join(tokens[i:i + words]).encode('utf-8')
          for i in range(max(1, len(tokens) - words + 1))}


class _BandKeys(beam.DoFn):
  """(hash, text) -> one (band key, (hash, signature)) per band."""

  def __init__(self, num_perm: int, bands: int, rows: int, shingle_words: int):
    self._num_perm, self._bands, self._rows = num_perm, bands, rows
    self._shingle_words = shingle_words
    self._template = None

  def setup(self):
    # crc32: a C hash of each shingle, a third of datasketch's default sha1 cost in this loop.
    self._template = datasketch.MinHash(self._num_perm, seed=_SEED, hashfunc=zlib.crc32)

  def process(self, element):
    key, text = element
    minhash = self._template.copy()  # reuses the permutations instead of drawing them again
    minhash.update_batch(list(shingles(text, self._shingle_words)))
    signature = minhash.hashvalues
    for band in range(self._bands):
      rows = signature[band * self._rows:(band + 1) * self._rows].tobytes()
      yield hashlib.blake2b(rows, digest_size=12, person=band.to_bytes(4, 'little')).digest(), (
          key, signature)


def _verified_pairs(group, threshold: float):
  """Pairs in one band bucket whose estimated Jaccard similarity reaches `threshold`.

  Exact duplicates are gone by now, so buckets stay small; a bucket of k costs k^2/2 compares."""
  _, members = group
  members = sorted(members, key=lambda m: m[0])
  if len(members) < 2:
    return
  signatures = np.stack([m[1] for m in members])
  for i in range(len(members) - 1):
    similar = (signatures[i + 1:] == signatures[i]).mean(axis=1) >= threshold
    for j in np.flatnonzero(similar):
      yield members[i][0], members[i + 1 + j][0]


def clusters(pairs) -> dict[str, str]:
  """Union-find over `pairs`: each member that is not its cluster's smallest hash -> that hash."""
  parent = {}

  def root(x):
    parent.setdefault(x, x)
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for a, b in pairs:
    ra, rb = root(a), root(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)  # the smallest hash ends up as the root
  return {x: root(x) for x in parent if root(x) != x}


class NearDuplicates(beam.PTransform):
  """(hash, text) -> (hash, representative hash) for every document that is a near copy."""

  def __init__(self, threshold: float, num_perm: int, shingle_words: int):
    super().__init__()
    self._threshold, self._num_perm, self._shingle_words = threshold, num_perm, shingle_words

  def expand(self, docs):
    bands, rows = lsh_bands(self._threshold, self._num_perm)
    return (docs
            | 'BandKeys' >> beam.ParDo(_BandKeys(self._num_perm, bands, rows, self._shingle_words))
            | 'GroupBands' >> beam.GroupByKey()
            | 'Verify' >> beam.FlatMap(_verified_pairs, self._threshold)
            | 'DistinctPairs' >> beam.Distinct()
            | 'AllPairs' >> beam.combiners.ToList()
            | 'UnionFind' >> beam.FlatMap(lambda pairs: sorted(clusters(pairs).items())))


def _first_of_group(group):
  key, texts = group
  texts = list(texts)
  return key, texts[0], len(texts) - 1


class ExactDuplicates(beam.PTransform):
  """(hash, text) -> (hash, text, number of further copies dropped), one per distinct text."""

  def expand(self, docs):
    return docs | 'GroupByHash' >> beam.GroupByKey() | 'First' >> beam.Map(_first_of_group)
