"""Throughput of `python -m prepare`: `python benchmarks/prepare_throughput.py [--copies=4]`.

Builds a corpus of several copies of the standard library's .py files (>= 100 MB for 4 copies),
each copy with half its words given a copy-specific suffix so copies are not duplicates of each
other, plus planted exact copies (1%) and near copies (2%, a few words edited). Runs prepare
with 1 and with 2 workers and prints documents/s, MB/s and the peak memory of the whole process
tree (sampled with psutil). Prints figures only; asserts nothing.
"""

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

_COPIES = flags.DEFINE_integer('copies', 4, 'copies of the standard library in the corpus')
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'worker counts to time')
_WORD = re.compile(r'[A-Za-z_]\w*')


def near_copy(text: str, rng: random.Random, edits: int) -> str:
  """`text` with `edits` of its words replaced by another word: a near duplicate."""
  words = text.split(' ')
  for i in rng.sample(range(len(words)), min(edits, len(words))):
    words[i] = rng.choice(('alpha', 'beta', 'gamma', 'delta'))
  return ' '.join(words)


def _varied(text: str, copy: int) -> str:
  """Half the identifiers (chosen by a hash of the word and copy) get a copy-specific suffix."""
  return _WORD.sub(lambda m: m[0] + f'_{copy}' if zlib.crc32(f'{m[0]}{copy}'.encode()) % 2
                   else m[0], text)


def build_corpus(directory: str, copies: int) -> int:
  rng = random.Random(0)
  texts = [open(f, encoding='utf-8', errors='replace').read() for f in sources.stdlib_files()]
  total = 0
  for copy in range(copies):
    for i, text in enumerate(texts):
      text = _varied(text, copy) if copy else text
      planted = {'': text}
      if rng.random() < 0.01:
        planted['.exact'] = text
      if rng.random() < 0.02:
        planted['.near'] = near_copy(text, rng, rng.randint(1, 5))
      for suffix, body in planted.items():
        with open(os.path.join(directory, f'{copy}-{i}{suffix}.txt'), 'w', encoding='utf-8') as f:
          total += f.write(body)
  return total


def _run(corpus: str, output: str, workers: int) -> tuple[float, float]:
  """Seconds and peak RSS (GB) of the process tree of one prepare run."""
  start = time.perf_counter()
  process = psutil.Popen([sys.executable, '-m', 'prepare', f'--input={corpus}/*.txt',
                          f'--output={output}', f'--workers={workers}'], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  peak = 0
  while process.poll() is None:
    rss = 0
    for p in [process] + process.children(recursive=True):
      try:
        rss += p.memory_info().rss
      except psutil.Error:
        pass
    peak = max(peak, rss)
    time.sleep(0.5)
  if process.returncode:
    raise SystemExit(f'prepare exited with {process.returncode}')
  return time.perf_counter() - start, peak / 1e9


def main(_):
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, 'corpus')
    os.mkdir(corpus)
    chars = build_corpus(corpus, _COPIES.value)
    size = sum(e.stat().st_size for e in os.scandir(corpus))
    print(f'corpus: {len(os.listdir(corpus))} files, {size / 1e6:.1f} MB ({chars} chars); '
          f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    for workers in map(int, _WORKERS.value):
      output = os.path.join(tmp, f'out{workers}')
      seconds, peak_gb = _run(corpus, output, workers)
      with open(os.path.join(output, 'report.json')) as f:
        report = json.load(f)
      print(f'workers={workers}: {seconds:.1f} s, {report["documents_in"] / seconds:.1f} docs/s, '
            f'{report["bytes_in"] / 1e6 / seconds:.2f} MB/s, peak RSS {peak_gb:.2f} GB; '
            f'{report["documents_out"]} of {report["documents_in"]} kept, '
            f'exact dups {report["exact_duplicates"]["documents_dropped"]}, near dups '
            f'{report["near_duplicates"]["documents_dropped"]}; load average '
            f'{os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
