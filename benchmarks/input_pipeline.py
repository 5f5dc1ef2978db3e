"""The input pipeline against training: does training ever wait for data?

`python benchmarks/input_pipeline.py [--runs=lm,cnn_augmented] [--steps=300] [--workdir_root=DIR]`

For each run:
  alone      the task's training pipeline drained by itself (no model) for --batches batches
             after 5 warm-up ones: its rate in tokens/s or images/s.
  training   train.py for --steps steps (no evaluation, logs every 10 steps, checkpoints every
             100), and from its metrics: the training rate (median over logged steps), the
             data-wait share of the whole run (the waits summed over all logged windows, weighed
             by window length) and its worst window, and the pipeline rate the run logged
             (`data/pipeline_*_per_second`, median), to set against the drained rate.
Runs: lm (configs/default.py, the default job), cnn_augmented (configs/fashion_mnist_cnn.py
with --augment, reading Fashion-MNIST from its data.path). The host is shared: the CPUs other
processes used meanwhile are printed too. Prints figures only.
"""

import functools
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import classifier_accuracy as runs  # pylint: disable=wrong-import-position
from data import pipeline  # pylint: disable=wrong-import-position
from models import MODELS  # pylint: disable=wrong-import-position
from tasks import TASKS  # pylint: disable=wrong-import-position

_RUNS = flags.DEFINE_list('runs', ['lm', 'cnn_augmented'], 'Which runs (see the docstring).')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per run.')
_BATCHES = flags.DEFINE_integer('batches', 200, 'Batches drained from the pipeline alone.')
_AUGMENT = flags.DEFINE_string('augment', 'flip,crop', 'data.augment of the cnn_augmented run.')
_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_input_pipeline', 'Run directories.')


def _overrides(name: str) -> tuple[str, dict]:
  """(config file, config overrides) of a run."""
  common = {'train.steps': _STEPS.value, 'train.log_every': 10, 'train.eval_every': 0,
            'train.checkpoint_every': 100}
  if name == 'lm':
    return 'default', {**common, 'task.num_samples': 0}
  if name == 'cnn_augmented':
    return 'fashion_mnist_cnn', {**common, 'data.augment': _AUGMENT.value,
                                 'optim.warmup_steps': 10}
  raise app.UsageError(f'--runs: unknown run {name!r}; known: lm, cnn_augmented')


def _config(config_name: str, overrides: dict):
  """The config train.py runs with these overrides."""
  config = importlib.import_module(f'configs.{config_name}').get_config('')
  for key, value in overrides.items():
    *sections, leaf = key.split('.')
    functools.reduce(getattr, sections, config)[leaf] = value
  return config


def drained_rate(config) -> float:
  """Units per second of the training pipeline alone, after 5 warm-up batches."""
  task = TASKS[config.task.name].Task(config, MODELS[config.model.name])
  iterator = iter(task.train_batches(pipeline.RecordStats()))
  try:
    for _ in range(5):
      next(iterator)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(iterator)
    seconds = time.perf_counter() - start
  finally:
    iterator.close()
  return _BATCHES.value * config.data.global_batch_size * task.units_per_example() / seconds


def wait_figures(records) -> tuple[float, float, float, float]:
  """(whole-run wait share, worst window's, median logged pipeline rate, median training rate)
  from the metrics of logged steps that have them."""
  logged = [r for r in records if 'data/wait_share' in r]
  unit = next(k for k in logged[0] if k.endswith('_per_second') and '/' not in k)
  windows = list(zip(logged[:-1], logged[1:]))
  lengths = [(b['step'] - a['step']) / b[unit] for a, b in windows]  # in units of a step's units
  waited = sum(b['data/wait_share'] * length for (_, b), length in zip(windows, lengths))
  rates = [v for r in logged for k, v in r.items() if k.startswith('data/pipeline_')]
  return (waited / sum(lengths), max(r['data/wait_share'] for r in logged),
          statistics.median(rates) if rates else float('nan'),
          statistics.median(r[unit] for r in logged))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')
  for name in _RUNS.value:
    config_name, overrides = _overrides(name)
    alone = drained_rate(_config(config_name, overrides))
    run = runs.run_train(runs.config_arg(config_name), os.path.join(_ROOT.value, name),
                         [f'--config.{k}={v}' for k, v in overrides.items()])
    if run.returncode:
      print(f'{name}: train.py failed ({runs.failure(run)})')
      continue
    share, worst, logged_rate, training_rate = wait_figures(run.records)
    print(f'{name}: pipeline alone {alone:,.0f}/s (logged {logged_rate:,.0f}/s); training '
          f'{training_rate:,.0f}/s; data wait {share:.3%} of the run, worst window {worst:.2%}; '
          f'other processes used {run.others_cpus:.1f} CPUs')


if __name__ == '__main__':
  app.run(main)
