"""Every optimiser on the same budget: final eval metric and wall time, a table and a plot.

`python benchmarks/optimizers.py [--jobs=fashion_mnist_cnn,default] [--optimizers=sgd,adamw,...]
[--steps=1000] [--lr=lion=1e-4,sgd=0.05] [--workdir_root=/tmp/podium_optimizers]
[--extra='--config.K=V ...']`

Each job (a config in configs/, presets after a colon: `default:tiny`) trains once per
optimiser with `--config.optim.name=<name> --config.optim.learning_rate=<its rate>`, each a
train.py process from a fresh workdir (benchmarks/classifier_accuracy.py's `run_train`), for
`--steps` steps with the job's own schedule and warmup (shrunk to a tenth of the steps if it
would not fit), evaluating ten times along the way. The other keys of each optimiser keep their
declared defaults (configs/common.py), except that a job's own AdamW tuning stays with AdamW.

Learning rates (`LEARNING_RATES`, overridden per optimiser with --lr) are the usual starting
points from each method's paper or reference implementation, not tuned here; they are the peak
of the schedule. One table per job is printed (final and best eval metric, wall time of the
whole process), and one PNG (WORKDIR_ROOT/optimizers.png) plots the eval curves, one panel
per job.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import classifier_accuracy as bench  # pylint: disable=wrong-import-position
from training import optimizer  # pylint: disable=wrong-import-position

LEARNING_RATES = {
    'sgd': 0.05,  # momentum 0.9: He et al. 2016 use 0.1 at batch 256; linearly scaled to 128
    'adam': 1e-3,  # Kingma & Ba 2015
    'adamw': 1e-3,  # Loshchilov & Hutter 2019; the configs' own (2e-3, 3e-3) are tuned
    'adagrad': 1e-2,  # Duchi et al. 2011; PyTorch's default
    'adadelta': 1.0,  # Zeiler 2012 has no rate; 1.0 reproduces it (PyTorch's default)
    'adamax': 2e-3,  # Kingma & Ba 2015, section 7.1
    'rmsprop': 1e-3,  # Hinton's lecture 6e; Keras's default
    'lion': 1e-4,  # Chen et al. 2023: 3-10x below AdamW's
    'adafactor': 1e-2,  # Shazeer & Stern 2018: relative step min(1e-2, 1/sqrt(t))
    'lamb': 5e-3,  # You et al. 2020 (BERT, large batches: 5e-3 .. 1e-2)
    'muon': 2e-2,  # Jordan et al. 2024 (modded-nanogpt); optax also uses it for its AdamW part
}


def metric_of(records) -> tuple[str, str]:
  """The job's headline eval metric and whether larger is better."""
  keys = {k for r in records for k in r}
  return ('eval/accuracy', 'max') if 'eval/accuracy' in keys else ('eval/loss', 'min')


def run_job(job: str, names, rates, steps: int, extra, root: str) -> dict:
  """optimiser -> the finished Run, for every optimiser on job `job`."""
  runs = {}
  for name in names:
    workdir = os.path.join(root, job.replace(':', '_').replace(',', '_'), name)
    train_flags = [*bench.steps_flags(job, steps),
                   f'--config.train.eval_every={max(steps // 10, 1)}',
                   f'--config.train.checkpoint_every={steps}',
                   f'--config.optim.name={name}', f'--config.optim.learning_rate={rates[name]}',
                   *extra]
    print(f'{job} {name}: train.py {" ".join(train_flags)}', flush=True)
    runs[name] = bench.run_train(bench.config_arg(job), workdir, train_flags)
    if runs[name].returncode:
      print(f'{job} {name}: {bench.failure(runs[name])}', flush=True)
  return runs


def table(job: str, runs: dict, rates) -> str:
  finished = [r for r in runs.values() if not r.returncode]
  key, mode = metric_of([rec for r in finished for rec in r.records])
  lines = [f'{job}: {key} after the budget ({mode} is better)',
           f'{"optimiser":<10} {"lr":>8} {"final":>9} {"best":>9} {"@step":>6} {"wall s":>7}']
  for name, run in runs.items():
    got = None if run.returncode else bench.final_and_best(run.records, key, mode)
    figures = (f'{got[0]:9.4f} {got[1]:9.4f} {got[2]:6d}' if got else f'{"failed":>9}' +
               ' ' * 17)
    lines.append(f'{name:<10} {rates[name]:8.1e} {figures} {run.wall_s:7.1f}')
  return '\n'.join(lines)


def plot(results: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top; slow to load
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axes = pyplot.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
  for ax, (job, runs) in zip(axes[0], results.items()):
    key, _ = metric_of([rec for r in runs.values() for rec in r.records])
    for name, run in runs.items():
      points = [(r['step'], r[key]) for r in run.records if key in r]
      if points:
        ax.plot(*zip(*points), marker='.', label=name)
    ax.set(title=job, xlabel='step', ylabel=key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def parse_rates(overrides) -> dict:
  rates = dict(LEARNING_RATES)
  for item in overrides:
    name, _, value = item.partition('=')
    if name not in rates:
      raise app.UsageError(f'--lr: unknown optimiser {name!r}')
    rates[name] = float(value)
  return rates


def main(argv):
  del argv
  names = [n for n in _OPTIMIZERS.value if n in optimizer.OPTIMIZERS]  # muon needs a new optax
  rates = parse_rates(_LR.value)
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  results = {job: run_job(job, names, rates, _STEPS.value, bench.extra_flags(_EXTRA.value),
                          _WORKDIR_ROOT.value) for job in _JOBS.value}
  for job, runs in results.items():
    print('\n' + table(job, runs, rates))
  path = os.path.join(_WORKDIR_ROOT.value, 'optimizers.png')
  plot(results, path)
  print(f'\nplot: {path}')


if __name__ == '__main__':
  _JOBS = flags.DEFINE_list('jobs', ['fashion_mnist_cnn', 'default'],
                            'configs/<name>.py[:presets] to train with every optimiser.')
  _OPTIMIZERS = flags.DEFINE_list('optimizers', list(LEARNING_RATES), 'Optimisers to compare.')
  _STEPS = flags.DEFINE_integer('steps', 1000, 'Steps per run (the budget).')
  _LR = flags.DEFINE_list('lr', [], 'Learning-rate overrides, e.g. lion=1e-4,sgd=0.05.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_optimizers',
                                      'Runs go to WORKDIR_ROOT/<job>/<optimiser>, deleted first.')
  _EXTRA = flags.DEFINE_multi_string('extra', [], 'More train.py flags for every run, split '
                                     "like a shell line, e.g. '--config.train.log_every=10'.")
  app.run(main)
