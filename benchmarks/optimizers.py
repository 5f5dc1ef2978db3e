"""Every optimiser on the same budget: final eval metric and wall time, a table and a plot.

`python benchmarks/optimizers.py [--jobs=fashion_mnist_cnn,default] [--optimizers=sgd,adamw,...]
[--steps=1000] [--lr=lion=1e-4,sgd=0.05] [--sweep=0.3,1,3 --sweep_steps=250]
[--workdir_root=/tmp/podium_optimizers] [--extra='--config.K=V ...']`

Each job (a config in configs/, presets after a colon: `default:tiny`) trains once per
optimiser with `--config.optim.name=<name> --config.optim.learning_rate=<its rate>`, each a
train.py process from a fresh workdir (benchmarks/classifier_accuracy.py's `run_train`), for
`--steps` steps with the job's own schedule and warmup (shrunk to a tenth of the steps if it
would not fit), evaluating ten times along the way (a tuning run: once, at its end). The other
keys of each optimiser keep their declared defaults (configs/common.py), except that a job's
own AdamW tuning stays with AdamW.

Learning rates are tuned per job and optimiser: each of the `--sweep` multiples of a
reference rate (`LEARNING_RATES`, the usual starting point from the method's paper or reference
implementation; overridden with --lr) trains for `--sweep_steps` steps, and the one with the
best final eval metric is the peak of the schedule for the budget run (a short sweep favours
larger rates a little). An empty --sweep uses the reference rates as they are. One table per
job is printed (the rate chosen, the short runs' final metrics, final and best eval metric of
the budget run and its wall time, whole process), and one PNG (WORKDIR_ROOT/optimizers.png)
plots the budget runs' eval curves, one panel per job.
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


def train(job: str, name: str, rate: float, steps: int, evals: int, extra, workdir: str):
  """One train.py run of `job` with optimiser `name` at peak rate `rate`, evaluating `evals`
  times."""
  train_flags = [*bench.steps_flags(job, steps),
                 f'--config.train.eval_every={max(steps // evals, 1)}',
                 f'--config.train.checkpoint_every={steps}',
                 f'--config.optim.name={name}', f'--config.optim.learning_rate={rate}', *extra]
  print(f'{job} {name}: train.py {" ".join(train_flags)}', flush=True)
  run = bench.run_train(bench.config_arg(job), workdir, train_flags)
  if run.returncode:
    print(f'{job} {name}: {bench.failure(run)}', flush=True)
  return run


def final_metric(run) -> float | None:
  """The run's final headline eval metric, larger better (a loss negated); None if failed."""
  key, mode = metric_of(run.records)
  got = None if run.returncode else bench.final_and_best(run.records, key, mode)
  if got is None or got[0] != got[0]:  # failed, never evaluated, or NaN
    return None
  return got[0] if mode == 'max' else -got[0]


def run_job(job: str, names, rates, factors, sweep_steps: int, steps: int, extra,
            root: str) -> dict:
  """optimiser -> (tuned rate, {swept rate: final metric}, the budget Run) on job `job`."""
  results = {}
  base = os.path.join(root, job.replace(':', '_').replace(',', '_'))
  for name in names:
    swept = {}
    for factor in factors:
      rate = float(f'{rates[name] * factor:.3g}')
      run = train(job, name, rate, sweep_steps, 1, extra,
                  os.path.join(base, 'sweep', name, f'{rate:g}'))
      swept[rate] = final_metric(run)
      print(f'{job} {name}: lr {rate:g} for {sweep_steps} steps -> {swept[rate]}', flush=True)
    finished = {r: m for r, m in swept.items() if m is not None}
    tuned = max(finished, key=finished.get) if finished else rates[name]
    results[name] = (tuned, swept, train(job, name, tuned, steps, 10, extra,
                                         os.path.join(base, name)))
  return results


def table(job: str, results: dict) -> str:
  finished = [run for _, _, run in results.values() if not run.returncode]
  key, mode = metric_of([rec for run in finished for rec in run.records])
  lines = [f'{job}: {key} after the budget ({mode} is better; "swept": final {key} of the '
           'short runs, by rate)',
           f'{"optimiser":<10} {"lr":>8} {"final":>9} {"best":>9} {"@step":>6} {"wall s":>7}'
           '  swept']
  for name, (rate, swept, run) in results.items():
    got = None if run.returncode else bench.final_and_best(run.records, key, mode)
    figures = (f'{got[0]:9.4f} {got[1]:9.4f} {got[2]:6d}' if got else f'{"failed":>9}' +
               ' ' * 17)
    sign = 1 if mode == 'max' else -1
    tried = ', '.join(f'{r:g}: ' + ('failed' if m is None else f'{sign * m:.4f}')
                      for r, m in swept.items())
    lines.append(f'{name:<10} {rate:8.1e} {figures} {run.wall_s:7.1f}  {tried}')
  return '\n'.join(lines)


def plot(results: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top; slow to load
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, axes = pyplot.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
  for ax, (job, tuned) in zip(axes[0], results.items()):
    runs = {name: run for name, (_, _, run) in tuned.items()}
    key, _ = metric_of([rec for r in runs.values() for rec in r.records])
    for i, (name, run) in enumerate(runs.items()):
      points = [(r['step'], r[key]) for r in run.records if key in r]
      if points:  # dashed once the ten default colours come round again
        ax.plot(*zip(*points), marker='.', linestyle='-' if i < 10 else '--', label=name)
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
  factors = [float(f) for f in _SWEEP.value]
  results = {job: run_job(job, names, rates, factors, _SWEEP_STEPS.value, _STEPS.value,
                          bench.extra_flags(_EXTRA.value), _WORKDIR_ROOT.value)
             for job in _JOBS.value}
  for job, tuned in results.items():
    print('\n' + table(job, tuned))
  path = os.path.join(_WORKDIR_ROOT.value, 'optimizers.png')
  plot(results, path)
  print(f'\nplot: {path}')


if __name__ == '__main__':
  _JOBS = flags.DEFINE_list('jobs', ['fashion_mnist_cnn', 'default'],
                            'configs/<name>.py[:presets] to train with every optimiser.')
  _OPTIMIZERS = flags.DEFINE_list('optimizers', list(LEARNING_RATES), 'Optimisers to compare.')
  _STEPS = flags.DEFINE_integer('steps', 1000, 'Steps per run (the budget).')
  _LR = flags.DEFINE_list('lr', [], 'Reference-rate overrides, e.g. lion=1e-4,sgd=0.05.')
  _SWEEP = flags.DEFINE_list('sweep', ['0.3', '1', '3'],
                             'Multiples of the reference rate to try; empty: no tuning.')
  _SWEEP_STEPS = flags.DEFINE_integer('sweep_steps', 250, 'Steps of each tuning run.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_optimizers',
                                      'Runs go to WORKDIR_ROOT/<job>/<optimiser>, deleted first.')
  _EXTRA = flags.DEFINE_multi_string('extra', [], 'More train.py flags for every run, split '
                                     "like a shell line, e.g. '--config.train.log_every=10'.")
  app.run(main)
