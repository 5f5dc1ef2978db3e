"""The parts of the training loop that are not the step (see `tasks.base.Part`).

Each is small and independent: evaluation, early stopping, checkpoints (with preemption and
save errors), the non-finite policy, metrics and throughput, data health, profiling.
`default_parts` lists them in the order the loop calls them; a researcher adds one (EMA weights,
a custom evaluation) by writing a Part and a config key.
"""

import contextlib
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from data.choices import Registry
from hardware import chips
from tasks.base import Part
from training import checkpointing, config_check, optimizer, report, metrics as metrics_lib


class TrainingHalted(RuntimeError):
  """A policy stopped training (non-finite step, failed save, bad data); says which and why."""


class Evaluator(Part):
  """Every `train.eval_every` steps and at the last one: the task's metrics on its validation
  split (eval/*), summed over every batch on device, then turned into figures on the host; all
  model selection reads these. When training is complete: the test split's (test/*), once, on
  early stopping's best parameters if it kept some, else the last."""

  def __init__(self, run):
    self.batches = [run.place_eval(b) for b in run.eval_batches]
    self.every = run.config.train.eval_every

  def after_step(self, run, step, state, metrics):
    if not (self.batches and self.every and (step % self.every == 0 or step == run.end)):
      return None
    started = time.perf_counter()
    run.last_eval_sums = _sums(run, state, self.batches)
    run.eval_seconds += time.perf_counter() - started  # kept out of training throughput
    figures = run.task.eval_metrics(run.last_eval_sums)
    return {f'eval/{k}': float(v) for k, v in figures.items()}

  def at_end(self, run, state):
    if not run.test_batches:
      return
    early = next((p for p in run.parts if isinstance(p, EarlyStopping)), None)
    kept = early.best_state(run) if early else None
    run.test_step = early.best_step if kept else run.step
    run.test_sums = _sums(run, kept or state, [run.place_eval(b) for b in run.test_batches])
    figures = {f'test/{k}': float(v) for k, v in run.task.eval_metrics(run.test_sums).items()}
    which = 'best/' if kept else 'last'
    run.logger.writer.add_to_last(figures)
    run.report_sections['test'] = {'step': run.test_step, 'parameters': which, **figures}
    run.announce(f'test split, step {run.test_step} ({which} parameters): ' +
                 '  '.join(f'{k} {v:.4f}' for k, v in figures.items()))


def _sums(run, state, batches):
  """The task's eval sums over `batches` (placed), as host arrays."""
  sums = None
  for batch in batches:
    # Fetched batch by batch and added up on the host: the sums are small, an add on the
    # devices is one more multi-device program per batch, and on XLA:CPU eval steps queued
    # behind each other stalled in an all-gather (7 of 8 devices arrived) when all were
    # dispatched before any was fetched.
    batch_sums = jax.device_get(run.eval_step(state['params'], state.get('model_state'), batch))
    sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
  return sums


def improved(value, best, mode: str, min_delta: float) -> bool:
  """Whether `value` beats `best` (None: nothing yet) by more than `min_delta`; mode min|max."""
  sign = 1.0 if mode == 'max' else -1.0
  return best is None or sign * (value - best) > min_delta


class EarlyStopping(Part):
  """Stops when `early_stop.metric` has not improved by `min_delta` for `patience` evals, and
  keeps the best step's parameters apart from the latest checkpoints (`WORKDIR/best/`)."""
  name = 'early_stopping'

  def __init__(self, run):
    self.cfg = run.config.early_stop
    self.key = f'eval/{self.cfg.metric}'
    self.best, self.best_step, self.bad_evals, self.stopped = None, 0, 0, ''
    better = (lambda m: m[self.cfg.metric])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=better, best_mode=self.cfg.mode, create=True,
        enable_async_checkpointing=False)
    self.best_manager = ocp.CheckpointManager(epath.Path(run.workdir) / 'best', options=options)

  def after_step(self, run, step, state, metrics):
    if self.key not in metrics:
      return None
    value = metrics[self.key]
    if improved(value, self.best, self.cfg.mode, self.cfg.min_delta):
      self.best, self.best_step, self.bad_evals = value, step, 0
      keep = {k: state[k] for k in ('params', 'model_state') if k in state}
      self.best_manager.save(step, args=ocp.args.StandardSave(keep),
                             metrics={self.cfg.metric: value}, force=True)
    else:
      self.bad_evals += 1
    if self.bad_evals >= self.cfg.patience and step < run.end:
      self.stopped = (f'early stopping at step {step}: {self.key} has not improved by more '
                      f'than {self.cfg.min_delta} for {self.bad_evals} evaluations; the best, '
                      f'{self.best:.6g} at step {self.best_step}, is kept in '
                      f'{self.best_manager.directory}')
      run.stop(self.stopped)
    return {'early_stop/best': self.best, 'early_stop/bad_evals': self.bad_evals}

  def best_state(self, run):
    """{'params', 'model_state'} of the best step, placed as training places them, or None if
    no evaluation has been kept."""
    if not self.best_step:
      return None
    abstract = {k: run.setup.abstract_state[k] for k in ('params', 'model_state')
                if k in run.setup.abstract_state}
    return self.best_manager.restore(self.best_step, args=ocp.args.StandardRestore(abstract))

  def checkpoint_state(self):
    return {'best': self.best, 'best_step': self.best_step, 'bad_evals': self.bad_evals,
            'stopped': self.stopped}

  def restore(self, run, saved):
    self.best, self.best_step = saved['best'], saved['best_step']
    self.bad_evals, self.stopped = saved['bad_evals'], saved['stopped']
    if self.stopped:
      run.stop(self.stopped)

  def close(self):
    self.best_manager.close()


class ReduceOnPlateau(Part):
  """optim.schedule=reduce_on_plateau: after an evaluation that makes more than `patience`
  without an improvement of `optim.plateau.metric`, multiplies the learning rate by `factor`,
  then ignores `cooldown` evaluations (PyTorch's ReduceLROnPlateau). The multiplier is an array
  in the optimizer state, so checkpoints and rollbacks carry it; the counters are saved here."""
  name = 'reduce_on_plateau'

  def __init__(self, run):
    self.cfg = run.config.optim.plateau
    self.key = f'eval/{self.cfg.metric}'
    self.best, self.bad_evals, self.cooldown = None, 0, 0

  def after_step(self, run, step, state, metrics):
    if self.key not in metrics:
      if any(k.startswith('eval/') for k in metrics):
        raise config_check.ConfigError(
            f'optim.plateau.metric: {self.cfg.metric!r} is not an eval metric of this task; it '
            f'has {", ".join(sorted(k[5:] for k in metrics if k.startswith("eval/")))}')
      return None
    if improved(metrics[self.key], self.best, self.cfg.mode, self.cfg.min_delta):
      self.best, self.bad_evals = metrics[self.key], 0
    else:
      self.bad_evals += 1
    if self.cooldown:
      self.cooldown, self.bad_evals = self.cooldown - 1, 0
    multiplier = optimizer.lr_multiplier(state['opt_state'])
    if self.bad_evals > self.cfg.patience:
      self.cooldown, self.bad_evals = self.cfg.cooldown, 0
      old = multiplier
      multiplier = jax.device_put(old * self.cfg.factor, old.sharding)  # float32, as on resume
      run.state = {**state, 'opt_state': optimizer.with_lr_multiplier(state['opt_state'],
                                                                      multiplier)}
      run.announce(f'step {step}: {self.key} has not improved; the learning rate is now '
                   f"{float(multiplier):.4g} x the schedule's")
    return {'plateau/lr_multiplier': float(multiplier), 'plateau/bad_evals': self.bad_evals}

  def checkpoint_state(self):
    return {'best': self.best, 'bad_evals': self.bad_evals, 'cooldown': self.cooldown}

  def restore(self, run, saved):
    self.best, self.bad_evals, self.cooldown = saved['best'], saved['bad_evals'], saved['cooldown']


class Checkpointer(Part):
  """Saves every `train.checkpoint_every` steps, at the last step and when preempted (SIGTERM,
  SIGINT, or a pod's preemption notice); a failed write warns or stops as configured."""

  def __init__(self, run, watcher):
    self.watcher = watcher
    self.preempted = False
    self.failure = ''  # the last failed write's error, for the run's last line

  def after_step(self, run, step, state, metrics):
    self.preempted = self.watcher.should_stop(step)
    final = step == run.end or self.preempted
    self.save(run, step, state, run.config.train.checkpoint_every, final)
    if self.preempted:
      run.stop(f'{self.watcher.signal_name or "Preemption"} received: saved step {step} to '
               f'{run.manager.directory / str(step)}; rerun to resume.', complete=False)
    return None

  def save(self, run, step, state, every, final):
    # An earlier write's failure is reported first, on its own: this step is saved regardless.
    with self._save_errors(run, step):
      checkpointing.raise_failed_save(run.manager)
    with self._save_errors(run, step):
      checkpointing.save(run.manager, step, state, run.train_iter, every, final=final,
                         loop_state=run.loop_state())
    if final:
      with self._save_errors(run, step):
        run.manager.wait_until_finished()
        # Not redundant: a write's error can still sit in the checkpointer's slot after the
        # wait returns (the disk-full test with on_save_error=warn misses it otherwise).
        run.manager.check_for_errors()

  def check_saved(self, run, step):
    """TrainingHalted unless the checkpoint of `step`, where the run ended, is complete."""
    run.manager.reload()  # its list of steps, as the storage has it
    if step in run.manager.all_steps():
      return
    kept = run.manager.latest_step()
    raise TrainingHalted(
        f'step {step} was not saved ({self.failure or "its checkpoint is missing"}); a rerun '
        + (f'resumes from step {kept}' if kept is not None else 'starts from scratch'))

  @contextlib.contextmanager
  def _save_errors(self, run, step):
    """A failed checkpoint write (disk full, storage down) warns or stops, as configured."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except; whatever the storage raised
      self.failure = (f'checkpoint write failed (noticed at step {step}; {type(e).__name__}: '
                      f'{" ".join(str(e).split())[:300]})')
      if run.config.train.on_save_error == 'stop':
        raise TrainingHalted(f'{self.failure}; the checkpoints already written are kept') from e
      run.announce(f'WARNING: {self.failure}; training continues')


class NonFinitePolicy(Part):
  """Skips, rolls back or stops on a step whose update the step's guard rejected (non-finite
  loss or gradients, or a loss spike): `train.nonfinite_policy`, one registered entry each."""
  POLICIES = Registry('train.nonfinite_policy', 'what a step whose update was rejected does')

  def __init__(self, run):
    self.rolled_back_for = set()
    self.act = self.POLICIES[run.config.train.nonfinite_policy].build

  def after_fetch(self, run, step, metrics):
    if metrics['guard/accept']:
      return
    what = ', '.join(k for k in ('nonfinite_loss', 'nonfinite_grads', 'loss_spike')
                     if metrics[f'guard/{k}'])
    self.act(self, run, step, what)

  @POLICIES.register('skip', 'counts and logs it, and goes on')
  def _skip(self, run, step, what):
    run.announce(f'step {step}: {what}; update skipped')

  @POLICIES.register('rollback', 'skips it, then restores the checkpoint before it (once)')
  def _rollback(self, run, step, what):
    self._skip(run, step, what)
    if step in self.rolled_back_for:
      return
    self.rolled_back_for.add(step)  # once: if the step fails again, skipping it is all
    restored = checkpointing.restore_before(run.manager, step, run.setup.abstract_state)
    if restored is None:
      run.announce('no checkpoint before it to roll back to; continuing')
      return
    run.announce(f'rolled back to step {int(restored["step"])}; its data is skipped')
    run.roll_back(restored)

  @POLICIES.register('stop', 'saves the step before it and stops (exit status 1)')
  def _stop(self, run, step, what):
    run.checkpointer.save(run, run.step, run.state, 1, final=True)
    raise TrainingHalted(f'step {step}: {what} (train.nonfinite_policy=stop); the update was '
                         f'not applied and step {run.step} is saved in {run.manager.directory}')


class Throughput:
  """Units/s (tokens, images, ...) and per device: units/s, analytic model TFLOP/s and MFU."""

  def __init__(self, run, step):
    config, task = run.config, run.task
    self.unit = task.unit
    self._step, self._time = step, time.perf_counter()
    per_example = task.units_per_example()
    self._units_per_step = config.data.global_batch_size * per_example
    model = run.setup.model_module
    self._flops_per_unit = model.train_flops_per_example(config.model, config) / per_example
    self._devices = run.mesh.size
    self._peak = chips.peak_flops_per_device(run.mesh.devices.flat[0])  # CPU: measured, ~1 s

  def update(self, step, excluded_seconds=0.0) -> dict[str, float]:
    """Rates since the last update; `excluded_seconds` (evaluation) do not count as training."""
    now = time.perf_counter()
    seconds = now - self._time - excluded_seconds
    rate = (step - self._step) * self._units_per_step / max(seconds, 1e-9)
    self._step, self._time = step, now
    flops_per_device = rate * self._flops_per_unit / self._devices
    return {f'{self.unit}_per_second': rate,
            f'perf/{self.unit}_per_second_per_device': rate / self._devices,
            'perf/model_tflops_per_device': flops_per_device / 1e12,
            'perf/mfu': flops_per_device / self._peak}


class Profiler(Part):
  """A JAX profiler trace of steps `train.profile_steps` = (first, count), into the TensorBoard
  log dir (plugins/profile/), on process 0 or, with `train.profile_all_hosts`, every host."""

  def __init__(self, run, start):
    first, count = run.config.train.profile_steps
    self.first, self.last = first, first + count - 1
    self.directory = str(epath.Path(run.workdir) / 'tensorboard')
    self.tracing = False
    self.enabled = count > 0 and (run.config.train.profile_all_hosts or
                                  jax.process_index() == 0)
    if self.enabled and start < self.first <= start + 1:  # the first step is the next one
      self._start(run)

  def _start(self, run):
    jax.profiler.start_trace(self.directory)
    self.tracing = True
    run.announce(f'profiling steps {self.first}-{self.last} into {self.directory}')

  def after_step(self, run, step, state, metrics):
    if not self.enabled:
      return
    if step == self.first - 1:
      self._start(run)
    elif self.tracing and (step == self.last or step == run.end):
      jax.block_until_ready(state)  # the trace ends after the step's device work does
      self.close()

  def close(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def device_memory(devices) -> dict[str, float]:
  """Device memory figures, each the largest over the local devices, where the backend reports
  them (CPUs do not)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  if not stats:
    return {}
  return {f'memory/{key}': float(max(s.get(key, 0) for s in stats))
          for key in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit')}


class MetricsLogger(Part):
  """Logged steps (every `train.log_every`, eval and health-check steps, the last) to
  WORKDIR/metrics/, TensorBoard and the progress bar."""

  def __init__(self, run, start):
    self.every = run.config.train.log_every
    self.throughput = Throughput(run, start)
    self.writer = metrics_lib.MetricsWriter(run.workdir, resumed_step=start)
    self.progress = metrics_lib.Progress(start, run.config.train.steps, self.throughput.unit)
    self.workdir, self.total_steps = run.workdir, run.config.train.steps

  def after_fetch(self, run, step, metrics):
    metrics = {k: v for k, v in metrics.items() if np.ndim(v) == 0}  # scalars only
    evaluated = any(k.startswith('eval/') for k in metrics)
    checked = any(k.startswith('health/') for k in metrics)  # training/health.py
    if not (step % self.every == 0 or step == run.end or evaluated or checked):
      return
    values = {**metrics, **self.throughput.update(step, run.eval_seconds),
              **run.data_health.figures(), **device_memory(jax.local_devices())}
    run.eval_seconds = 0.0
    self.writer.write(step, values)
    self.progress.update(step, values)
    if evaluated:
      figures = '  '.join(f'{k} {v:.4f}' for k, v in values.items() if k.startswith('eval/'))
      self.progress.write(f"step {step}: train/loss {values['train/loss']:.4f}  {figures}")

  def rewind(self, step):
    self.writer.rewind(step)

  def close(self):
    self.progress.close()
    self.writer.close()

  def at_end(self, run, state):
    """The run report, once training is complete (never while a preempted run has seconds to
    save and exit)."""
    if self.writer.enabled:
      try:
        report.write(self.workdir, metrics_lib.read_metrics(self.workdir), self.total_steps,
                     run.report_sections)
      except Exception as e:  # pylint: disable=broad-except; the run itself is saved and fine
        logging.warning('The run report (summary.json, report.png) was not written: %s: %s',
                        type(e).__name__, e)


_MIN_RECORDS_FOR_BAD_FRACTION = 100  # too few records make the fraction noise


class DataHealth(Part):
  """The input pipeline's health: reports newly skipped records and stops when too large a share
  of them is unusable; times the wait for each batch (`next_batch`) and reports, on logged
  steps, the share of the time training waited for data and the pipeline's own rate (see
  data.pipeline.RecordStats), warning while the share is above `data.warn_wait_share`."""

  def __init__(self, run, stats):
    self.run, self.stats, self.reported = run, stats, 0
    self.limit, self.warn_share = run.config.data.max_bad_fraction, run.config.data.warn_wait_share
    # Each process's pipeline makes its rows of a global batch; all together make one.
    self.units_per_batch = run.config.data.global_batch_size * run.task.units_per_example()
    self.rate_key = f'data/pipeline_{run.task.unit}_per_second'
    self.window_start = self.waited = None  # None until a batch after the first
    self.made = (0, 0.0)  # stats.batches and stats.batch_seconds at the window's start
    self.warned = False

  def next_batch(self, iterator):
    """The iterator's next batch. The first batch's wait is left out (start-up, then
    compiling follows it), so windows start at the second."""
    started = time.perf_counter()
    batch = next(iterator)
    if self.waited is None:
      self.waited = 0.0
    else:
      self.window_start = self.window_start or started
      self.waited += time.perf_counter() - started
    return batch

  def figures(self):
    stats = self.stats
    figures = {'data/bad_records': stats.bad, 'data/bad_fraction': stats.bad_fraction}
    if self.window_start is None:
      return figures
    now = time.perf_counter()
    share = self.waited / max(now - self.window_start - self.run.eval_seconds, 1e-9)
    batches, seconds = stats.batches - self.made[0], stats.batch_seconds - self.made[1]
    figures['data/wait_share'] = share
    if seconds > 0:  # all processes' pipelines together, like the training rate
      figures[self.rate_key] = batches * self.units_per_batch / seconds
    self.window_start, self.waited, self.made = now, 0.0, (stats.batches, stats.batch_seconds)
    if share > self.warn_share and not self.warned:
      self.run.announce(f'WARNING: training waited for data {share:.1%} of the time since the '
                        f'last log (> data.warn_wait_share={self.warn_share}): the input '
                        'pipeline is too slow; raise data.worker_threads or prefetch_batches')
    self.warned = share > self.warn_share  # warn again only after it recovers
    return figures

  def after_fetch(self, run, step, metrics):
    stats = self.stats
    if stats.bad > self.reported:
      run.announce(f'data: skipped {stats.bad} unusable of {stats.seen} records read, '
                   f'e.g. {stats.examples[0]}')
      self.reported = stats.bad
    if stats.seen >= _MIN_RECORDS_FOR_BAD_FRACTION and stats.bad_fraction > self.limit:
      raise TrainingHalted(f'data: {stats.bad} of {stats.seen} records read were unusable '
                           f'({stats.bad_fraction:.1%} > data.max_bad_fraction={self.limit}), '
                           f'e.g. {"; ".join(stats.examples)}')
