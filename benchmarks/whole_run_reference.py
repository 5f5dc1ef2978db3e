"""`whole_run.py --vs_reference`: podium's job and its PyTorch reference, alternating.

char: nanoGPT's README CPU command with issue 22's shape, run in a copy of the --nanogpt
checkout under the workdir with tiny-shakespeare prepared there by nanoGPT's own
data/shakespeare_char/prepare.py (from --data; it downloads nothing when input.txt is there).
fashion_mnist_cnn: benchmarks/torch_cnn_reference.py --train_steps (the same network, optimiser,
schedule, evaluations and checkpoints in PyTorch eager).
Each pair runs podium first, then the reference; the figures are from wait4 (CPU time, the
kernel's peak RSS) and the wall clock, with the load average beside them.
"""

import os
import shutil
import statistics
import subprocess
import sys

from benchmarks import run_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NANOGPT_FLAGS = ('config/train_shakespeare_char.py', '--device=cpu', '--compile=False',
                  '--eval_iters=20', '--log_interval=1', '--block_size=64', '--batch_size=12',
                  '--n_layer=4', '--n_head=4', '--n_embd=128', '--dropout=0.0')


def fail(message: str):
  print(f'whole_run.py: {message}', file=sys.stderr)
  sys.exit(2)


def _nanogpt(workdir: str, source: str, data_file: str, steps: int) -> tuple[list[str], str]:
  """(command, cwd) of nanoGPT's char run, its checkout copied and its data prepared once."""
  if not source or not os.path.exists(os.path.join(source, 'train.py')):
    fail(f'--nanogpt={source!r} is not a nanoGPT checkout (git clone '
                   'https://github.com/karpathy/nanoGPT)')
  copy = os.path.join(workdir, 'nanogpt')
  data = os.path.join(copy, 'data', 'shakespeare_char')
  if not os.path.exists(os.path.join(data, 'train.bin')):
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns('.git', 'out*'))
    if not os.path.exists(data_file):
      fail(f'--data={data_file} does not exist; point it at tiny-shakespeare')
    shutil.copy(data_file, os.path.join(data, 'input.txt'))
    subprocess.run([sys.executable, 'prepare.py'], cwd=data, check=True, capture_output=True)
  steps = steps or 2000
  return [sys.executable, 'train.py', *_NANOGPT_FLAGS, f'--max_iters={steps}',
          f'--lr_decay_iters={steps}'], copy


def _torch_cnn(workdir: str, steps: int) -> tuple[list[str], str]:
  steps = steps or 4690
  return [sys.executable, os.path.join(REPO, 'benchmarks', 'torch_cnn_reference.py'),
          f'--train_steps={steps}'], workdir


def _reference(job: str, workdir: str, nanogpt: str, data: str, steps: int):
  if job == 'char':
    command, cwd = _nanogpt(workdir, nanogpt, data, steps)
    shutil.rmtree(os.path.join(cwd, 'out-shakespeare-char'), ignore_errors=True)
  elif job == 'fashion_mnist_cnn':
    command, cwd = _torch_cnn(workdir, steps)
  else:
    fail(f'--vs_reference: no reference for --job={job} (char, fashion_mnist_cnn)')
  trace = run_trace.trace(command, cwd, dict(os.environ))
  if trace.status != 0:
    print(trace.text()[-3000:])
    fail(f'the reference exited with status {trace.status}: {" ".join(command)}')
  return trace


def _describe(name: str, trace, load: str) -> str:
  return (f'  {name:<10} wall {trace.wall_s:7.1f} s  CPU {trace.cpu_s:7.1f} s  peak RSS '
          f'{trace.peak_rss_mib:5.0f} MiB  ({load})')


def compare(job: str, workdir: str, pairs: int, run_podium, nanogpt: str, data: str,
            steps: int):
  """Prints each pair and the median ratios podium / reference; `run_podium(workdir)` runs
  podium's job, prints its phase table and returns its run_trace.Trace."""
  ratios = []
  reference_dir = os.path.join(workdir, 'reference')
  os.makedirs(reference_dir, exist_ok=True)
  for pair in range(pairs):
    podium = run_podium(os.path.join(workdir, 'podium'))
    podium_load = run_trace.uptime()
    reference = _reference(job, reference_dir, nanogpt, data, steps)
    print(f'pair {pair + 1}:')
    print(_describe('podium', podium, podium_load))
    print(_describe('reference', reference, run_trace.uptime()))
    for line in reference.text().splitlines()[-2:]:
      print(f'    reference: {line}')
    ratios.append((podium.wall_s / reference.wall_s, podium.cpu_s / reference.cpu_s,
                   podium.peak_rss_mib / reference.peak_rss_mib))
  wall, cpu, rss = (statistics.median(r[i] for r in ratios) for i in range(3))
  walls = [r[0] for r in ratios]
  spread = f' ({min(walls):.3f}-{max(walls):.3f})' if pairs > 1 else ''
  print(f'podium / reference ({job}, {pairs} pair(s), medians): wall {wall:.3f}{spread}, '
        f'CPU {cpu:.3f}, peak RSS {rss:.2f}x')
