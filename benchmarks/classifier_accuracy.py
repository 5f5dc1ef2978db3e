"""Accuracy, time to accuracy and throughput of the image classifiers, each a real train.py run.

`python benchmarks/classifier_accuracy.py --configs=fashion_mnist_cnn,fashion_mnist_resnet,vit
[--workdir_root=/tmp/podium_bench] [--steps=N] [--target=0.92] [--extra='--config.K=V ...']`

Each config (a file in configs/, presets after a colon: `fashion_mnist_cnn:tiny`) trains with
`python train.py --config=configs/<name>.py[:presets] --workdir=WORKDIR_ROOT/<name>` in its own
process, from a fresh workdir (an earlier run there is deleted first), its output streamed to
WORKDIR/train.log. `--steps` overrides `train.steps` (and shrinks a warmup that would not fit
to a tenth of it); `--extra` (repeatable, split like a shell line, after the others so it wins)
passes more train.py flags to every run. Then one line per config:

  accuracy   final eval/accuracy (validation), and the best with its step; then test/accuracy,
             evaluated once at the end (on best/ with early stopping, else the last step);
  wall       the whole process: start-up, data, compiling, evaluation and checkpoints;
  to target  when eval/accuracy first reached --target. The metrics have no timestamps, so
             this script watches them while train.py runs and notes when each record appears,
             in seconds since the process started: "watched". A step's record is written once
             the next step is dispatched, so this is late by about a step plus --poll seconds,
             and an eval is on the eval_every grid (once an epoch in the Fashion-MNIST
             configs). Beside it, "estimated": the sum over the logged intervals up to that
             step of steps x global batch / images_per_second, i.e. training only (compiling
             counts, since the first interval includes it; evaluation does not, as
             images_per_second excludes it).
  images/s   the median of images_per_second (and of perf/mfu) over logged steps that are not
             eval steps (here also the checkpoint steps, whose save time counts in the rate)
             and not the first logged one (it includes compiling). For the
             same-hour comparison with benchmarks/torch_cnn_reference.py:
             `--configs=fashion_mnist_cnn --steps=300 --extra=--config.train.eval_every=0`.
  params     the count train.py announces at start.
  machine    CPUs that other processes used, on average, while it ran (the host is shared).

Prints figures only. `run_train` and `summary` are the pieces benchmarks/finetune_vs_scratch.py
reuses.
"""

import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from training import metrics as metrics_lib  # pylint: disable=wrong-import-position

_RUN_FILES = ('config.json', 'metrics', 'train.log', 'checkpoints')


@dataclasses.dataclass
class Run:
  """One finished train.py process."""
  workdir: str
  returncode: int
  wall_s: float
  records: list[dict]  # training.metrics.read_metrics
  seen_s: dict[int, float]  # step -> seconds after start when its record appeared
  others_cpus: float  # CPUs other processes used on average meanwhile (nan: unknown)
  peak_rss_mib: float = float('nan')  # the process's peak resident memory, last seen (Linux)

  @property
  def log(self) -> str:
    with open(os.path.join(self.workdir, 'train.log'), encoding='utf-8', errors='replace') as f:
      return f.read()

  def config(self) -> dict:
    with open(os.path.join(self.workdir, 'config.json'), encoding='utf-8') as f:
      return json.load(f)


def config_arg(name: str) -> str:
  """'fashion_mnist_cnn:tiny' -> '<repo>/configs/fashion_mnist_cnn.py:tiny'."""
  file, _, presets = name.partition(':')
  path = os.path.join(REPO, 'configs', f'{file}.py')
  return f'{path}:{presets}' if presets else path


def fresh_workdir(path: str):
  """Deletes an earlier run at `path`; refuses a directory that does not look like one."""
  if os.path.isdir(path) and os.listdir(path):
    if not any(os.path.exists(os.path.join(path, f)) for f in _RUN_FILES):
      raise SystemExit(f'{path} is not empty and holds no train.py run; not deleting it')
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)


def run_train(config: str, workdir: str, flags_=(), poll_s: float = 0.5) -> Run:
  """Runs `train.py --config=<config> --workdir=<workdir> <flags_>` from a fresh workdir,
  output to WORKDIR/train.log, watching its metrics for when each record appears."""
  fresh_workdir(workdir)
  command = [sys.executable, os.path.join(REPO, 'train.py'), f'--config={config}',
             f'--workdir={workdir}', *flags_]
  records, seen_s = [], {}
  with open(os.path.join(workdir, 'train.log'), 'w', encoding='utf-8') as log:
    log.write(shlex.join(command) + '\n')
    log.flush()
    busy0, children0 = _busy_cpu_seconds(), _children_cpu_seconds()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    peak_rss = float('nan')
    try:
      while True:
        peak_rss = _peak_rss_mib(process.pid, peak_rss)
        done = process.poll() is not None
        now = time.perf_counter() - start
        records = _read_records(workdir, records)
        steps = {r['step'] for r in records}
        seen_s = {s: t for s, t in seen_s.items() if s in steps}  # a rollback rewrote them
        seen_s.update({s: now for s in steps if s not in seen_s})
        if done:
          break
        time.sleep(poll_s)
    except BaseException:  # Ctrl-C here: train.py saves its step and exits on SIGTERM
      process.send_signal(signal.SIGTERM)
      process.wait()
      raise
    wall_s = time.perf_counter() - start
  others = (_busy_cpu_seconds() - busy0 - (_children_cpu_seconds() - children0)) / wall_s
  return Run(workdir, process.returncode, wall_s, records, seen_s, others, peak_rss)


def _peak_rss_mib(pid: int, last: float) -> float:
  """The process's peak resident memory so far (VmHWM), or `last` once it is gone."""
  try:
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration, ValueError):
    return last


def _read_records(workdir, last_good):
  """The run's metrics; `last_good` if a rollback deleted a chunk as it was being read."""
  try:
    return metrics_lib.read_metrics(workdir)
  except FileNotFoundError:
    return last_good


def _busy_cpu_seconds() -> float:
  """CPU seconds the whole machine has been busy (/proc/stat); nan where unavailable."""
  try:
    with open('/proc/stat', encoding='ascii') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return float('nan')
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK')  # less idle and iowait


def _children_cpu_seconds() -> float:
  own = os.times()
  return own.children_user + own.children_system + own.user + own.system


def final_and_best(records, key: str, mode: str = 'max'):
  """(final value, best value, best step) of `key` over the records that have it, or None."""
  having = [r for r in records if key in r]
  if not having:
    return None
  pick = max if mode == 'max' else min
  best = pick(having, key=lambda r: r[key])
  return having[-1][key], best[key], best['step']


def summary(run: Run, keys: dict[str, str]) -> str:
  """'name final F, best B @step' for each eval metric in `keys` (key -> 'max' or 'min')."""
  parts = []
  for key, mode in keys.items():
    got = final_and_best(run.records, key, mode)
    if got:
      parts.append(f'{key.removeprefix("eval/")} {got[0]:.4f} (best {got[1]:.4f} @{got[2]})')
    test = final_and_best(run.records, 'test/' + key.removeprefix('eval/'), mode)
    if test:
      parts.append(f'test {test[0]:.4f}')
  return ', '.join(parts) or 'no eval records'


def param_count(run: Run):
  """The parameter count train.py announced ('... 421,642 parameters.'), or None."""
  found = re.search(r'([\d,]+) parameters\)?\.', run.log)
  return int(found.group(1).replace(',', '')) if found else None


def failure(run: Run) -> str:
  tail = run.log.strip().splitlines()[-3:]
  return f'FAILED (exit {run.returncode}): ' + ' | '.join(line[-200:] for line in tail)


def train_rates(records, unit: str = 'images'):
  """Medians of `<unit>_per_second` and perf/mfu over logged steps that are neither eval
  steps nor the first (compiling); all of them if that leaves none. Also how many."""
  logged = [r for r in records if f'{unit}_per_second' in r]
  kept = [r for r in logged[1:] if not any(k.startswith('eval/') for k in r)] or logged
  if not kept:
    return float('nan'), float('nan'), 0
  return (statistics.median(r[f'{unit}_per_second'] for r in kept),
          statistics.median(r.get('perf/mfu', float('nan')) for r in kept), len(kept))


def estimated_seconds(records, units_per_step: int, unit: str = 'images') -> dict[int, float]:
  """step -> training seconds up to that logged step: the sum over logged intervals of
  steps x units_per_step / <unit>_per_second (evaluation excluded, compiling included)."""
  total, previous, out = 0.0, 0, {}
  for r in records:
    rate = r.get(f'{unit}_per_second')
    if rate:
      total += (r['step'] - previous) * units_per_step / rate
      previous = r['step']
    out[r['step']] = total
  return out


def time_to_target(run: Run, target: float) -> str:
  reached = [r for r in run.records if r.get('eval/accuracy', -1.0) >= target]
  if not reached:
    return f'to {target}: not reached'
  step = reached[0]['step']
  batch = run.config()['data']['global_batch_size']
  estimated = estimated_seconds(run.records, batch).get(step, float('nan'))
  watched = run.seen_s.get(step, float('nan'))
  return (f'to {target}: step {step}, {watched / 60:.2f} min watched '
          f'({estimated / 60:.2f} min estimated, training only)')


def main(argv):
  del argv
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  for name in _CONFIGS.value:
    workdir = os.path.join(_WORKDIR_ROOT.value, name.replace(':', '_').replace(',', '_'))
    train_flags = steps_flags(name, _STEPS.value) + extra_flags(_EXTRA.value)  # extra wins
    print(f'{name}: train.py {shlex.join(train_flags)}', flush=True)
    run = run_train(config_arg(name), workdir, train_flags, _POLL.value)
    if run.returncode:
      print(f'{name}: {failure(run)} ({workdir}/train.log)', flush=True)
      continue
    rate, mfu, n = train_rates(run.records)
    params = param_count(run)
    print(f'{name}: {summary(run, {"eval/accuracy": "max"})}; '
          f'wall {run.wall_s / 60:.2f} min; {time_to_target(run, _TARGET.value)}; '
          f'{rate:,.0f} images/s, MFU {mfu:.2%} (median of {n} logged steps); '
          f'{f"{params:,}" if params else "?"} params; others used {run.others_cpus:.2f} CPUs',
          flush=True)


def steps_flags(name: str, steps: int) -> list[str]:
  """train.py flags for `steps` steps of config `name`: a warmup that would not fit (the
  config refuses warmup_steps >= steps) shrinks to a tenth of the steps."""
  if not steps:
    return []
  file, _, presets = name.partition(':')
  config = importlib.import_module(f'configs.{file}').get_config(presets)
  warmup = ([f'--config.optim.warmup_steps={steps // 10}']
            if config.optim.warmup_steps >= steps else [])
  return [f'--config.train.steps={steps}', *warmup]


def extra_flags(values) -> list[str]:
  """A repeatable --extra flag's values, each split like a shell line."""
  return [f for line in values for f in shlex.split(line)]


if __name__ == '__main__':
  # Defined here, not on import: benchmarks/finetune_vs_scratch.py imports this module.
  _CONFIGS = flags.DEFINE_list('configs', ['fashion_mnist_cnn', 'fashion_mnist_resnet', 'vit'],
                               'configs/<name>.py[:presets] to train, one process each.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_bench',
                                      'Each run goes to WORKDIR_ROOT/<config>, deleted first.')
  _STEPS = flags.DEFINE_integer('steps', 0, "Overrides train.steps (0: the config's).")
  _TARGET = flags.DEFINE_float('target', 0.92, 'The eval accuracy to time.')
  _EXTRA = flags.DEFINE_multi_string('extra', [], 'More train.py flags for every run, split '
                                     "like a shell line, e.g. '--config.train.log_every=10'.")
  _POLL = flags.DEFINE_float('poll', 0.5, "Seconds between looks at the run's metrics.")
  app.run(main)
