"""The training loop: mesh -> data -> state (new or restored) -> steps, with parts attached.

The loop only runs steps; everything else (evaluation, checkpoints, the non-finite policy,
metrics, early stopping, samples) is a part (`training/parts/`, `tasks.base.Part`).
"""

import sys
import time

import jax
from etils import epath
import numpy as np
import tqdm

from data import pipeline
from parallel import sharding
from tasks import base
from training import checkpointing, config_check, exit_codes, health, preemption
from training import parts as parts_lib
from training import step as step_lib
from training import warm_start, watchdog
from training.parts import checkpointer, data_health, early_stopping, evaluation
from training.parts import metrics_logger, nonfinite, plateau, profiler
from training import state as state_lib

TrainingHalted = parts_lib.TrainingHalted


def train(config, workdir: str, compile_cache: str | None = None) -> int:
  """Trains to `config.train.steps` (or `stop_after`, or an early stop), resuming from `workdir`
  if it has a run. `compile_cache`: a directory for compiled programs, or None. Returns the exit
  status: exit_codes.DONE, or PREEMPTED when a signal stopped it with its step saved.
  """
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  for line in sharding.unsharded_params(setup.param_template, mesh, config.mesh.rules):
    announce(f'WARNING: {line}')
  record_stats = pipeline.RecordStats()
  try:
    train_iter = iter(setup.task.train_batches(record_stats))
  except ValueError as e:  # no files match, unknown dataset
    raise config_check.ConfigError(str(e)) from None
  try:
    _refuse_a_bad_init_from(config, workdir, setup)
    eval_batches, test_batches = _whole_splits(setup.task)
    # Only now: a run refused for its config, data or init_from must write nothing.
    _create_workdir(workdir)
    if compile_cache:
      use_compile_cache(compile_cache)
    manager = checkpointing.make_manager(workdir, config.train)
    try:
      with sharding.activate(mesh, config.mesh.rules):
        run = Run(config, workdir, mesh, setup, manager, train_iter, eval_batches, test_batches)
        run.train(record_stats)
        return run.exit_status()
    finally:
      manager.close()  # waits for a save still being written
  finally:
    train_iter.close()


def _refuse_a_bad_init_from(config, workdir, setup):
  """InitFromError for an `init_from` this run would fail to load, checked before anything is
  written (it is read only by a run with no checkpoint of its own)."""
  checkpoints = epath.Path(workdir) / 'checkpoints'
  if config.init_from and not (checkpoints.exists() and any(
      p.name.isdigit() for p in checkpoints.iterdir())):
    warm_start.check(config.init_from, setup.abstract_state['params'])


def _whole_splits(task):
  """The task's (validation, test) batches, read before anything is written."""
  try:
    return task.eval_batches(), task.test_batches()
  except pipeline.UnusableDataError:
    raise  # bad data, not a bad config
  except ValueError as e:  # a split is missing or unreadable
    raise config_check.ConfigError(str(e)) from None


def _create_workdir(workdir: str):
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # under a file, on a read-only disk, in /proc, ...
    raise config_check.ConfigError(
        f'--workdir: cannot create {workdir}: {e.strerror or type(e).__name__}') from None


class Run:
  """One training run: the state of the loop, and what parts may ask of it."""

  def __init__(self, config, workdir, mesh, setup, manager, train_iter, eval_batches,
               test_batches):
    self.config, self.workdir, self.mesh, self.setup = config, workdir, mesh, setup
    self.task, self.manager, self.train_iter = setup.task, manager, train_iter
    self.eval_batches, self.test_batches = eval_batches, test_batches  # on the host
    self.train_step, self.eval_step = step_lib.compile_steps(setup, config, mesh)
    rules = config.mesh.rules
    self.place_train = base.batch_placer(self.task.batch_spec('train'), mesh, rules)
    self.place_eval = base.batch_placer(self.task.batch_spec('eval'), mesh, rules)
    self.end = self.step = 0
    self.state = None
    self.stop_reason, self.complete = '', False
    self.last_eval_sums, self.eval_seconds = None, 0.0
    self.test_sums, self.test_step = None, None  # the test split's, once training is complete
    self.report_sections = {}  # parts' own sections of summary.json, e.g. the class histogram
    self._rolled_back_to = None
    self.parts = []
    self.checkpointer = None  # made when steps start

  def exit_status(self) -> int:
    preempted = self.checkpointer is not None and self.checkpointer.preempted
    return exit_codes.PREEMPTED if preempted else exit_codes.DONE

  def stop(self, reason: str, complete: bool = True):
    """Ends training after the current step (which is then saved). A `complete` run is done
    (early stopping): end-of-run parts run and a rerun does not resume it; an incomplete one
    (preemption) resumes on the next run."""
    self.stop_reason, self.end, self.complete = reason, self.step, complete

  def roll_back(self, state):
    self._rolled_back_to = state

  def announce(self, line: str):
    announce(line)

  def loop_state(self) -> dict:
    """What the parts need to resume exactly, saved with every checkpoint."""
    return {p.name: p.checkpoint_state() for p in self.parts if p.name}

  def train(self, record_stats):
    self.data_health = data_health.DataHealth(self, record_stats)
    self.evaluator = evaluation.Evaluator(self)
    restored = checkpointing.restore_latest(self.manager, self.setup.abstract_state,
                                            self.train_iter, announce)
    early = ([early_stopping.EarlyStopping(self)] if self.config.early_stop.metric else [])
    plateaus = ([plateau.ReduceOnPlateau(self)]
               if self.config.optim.schedule == 'reduce_on_plateau' else [])
    gradients = [health.GradientHealth(self)] if self.config.health.every else []
    # Before restore: their state is in the checkpoint.
    self.parts = [self.evaluator, *early, *plateaus, *gradients]
    if restored is None:
      state, start = state_lib.init_state(self.config, self.setup), 0
      params = state_lib.count_params(self.setup.abstract_state['params'])
      if self.config.init_from:
        state, loaded = warm_start.load(self.config.init_from, state)
        announce(f'Starting from {self.config.init_from}: {loaded} of the '
                 f'{len(jax.tree.leaves(state["params"]))} parameter arrays loaded, the rest '
                 f'new ({params:,} parameters).')
      else:
        announce(f'Starting from scratch: {params:,} parameters.')
    else:
      start, state, loop_state = restored
      announce(f'Resumed from the checkpoint at step {start}.')
      self.step = start
      for part in self.parts:
        if part.name in (loop_state or {}):
          part.restore(self, loop_state[part.name])
    _write_config(self.workdir, self.config)
    try:
      return self._train_from(state, start)
    finally:
      for part in self.parts:
        getattr(part, 'close', lambda: None)()

  def _train_from(self, state, start):
    config = self.config
    if start >= config.train.steps or self.stop_reason:
      announce(f'Training is already complete: {self.workdir} holds step {start} of '
               f'{config.train.steps}' + (f' ({self.stop_reason})' if self.stop_reason else '')
               + '.')
      return state
    self.end = min(config.train.steps, config.train.stop_after or config.train.steps)
    t = config.train
    with preemption.PreemptionWatcher(self.manager) as watcher, \
        watchdog.Watchdog(t.hang_factor, t.hang_min_seconds,
                          self.manager.wait_until_finished) as dog:
      self.checkpointer = checkpointer.Checkpointer(self, watcher)
      self.logger = metrics_logger.MetricsLogger(self, start)
      self.parts += [self.checkpointer, nonfinite.NonFinitePolicy(self), self.data_health,
                     self.logger, profiler.Profiler(self, start), *self.task.parts(self)]
      state = self._steps(state, start, dog)  # the logger stays open for at_end's test figures
    self.checkpointer.check_saved(self, self.step)
    if self.stop_reason:
      announce(self.stop_reason)
    if self.step == config.train.steps or self.complete:
      for part in self.parts:
        part.at_end(self, state)
    return state

  def _steps(self, state, step, dog):
    """Steps after `step` up to `self.end`, reading step N's metrics only after step N+1 is
    dispatched; returns the final state."""
    previous = None  # (step, metrics): device arrays, and host floats added by parts
    while step < self.end or previous:
      dog.beat()
      current = None
      if step < self.end:
        step += 1
        if step == self.config.train.debug_hang_at_step:  # fault injection, for the watchdog
          time.sleep(1e6)
        batch = self.data_health.next_batch(self.train_iter)
        state, device_metrics = self.train_step(state, self.place_train(batch))
        current = (step, device_metrics)
      self.step, self.state = step, state
      if previous:
        fetched = {k: float(v) if np.ndim(v) == 0 else v  # vectors: e.g. health/norms
                   for k, v in jax.device_get(previous[1]).items()}
        for part in self.parts:
          extra = part.after_fetch(self, previous[0], fetched)
          if self._rolled_back_to is not None:
            break
          if extra:
            fetched = {**fetched, **extra}
        if self._rolled_back_to is not None:
          state, self._rolled_back_to = self._rolled_back_to, None
          step, previous = int(state['step']), None
          self.logger.rewind(step)
          continue
      if current:
        for part in self.parts:
          extra = part.after_step(self, step, self.state, current[1])
          if extra:
            current = (step, {**current[1], **extra})
        state = self.state  # a part may have replaced it (reduce_on_plateau's multiplier)
      previous = current
    return state


def _write_config(workdir, config):
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))


def use_compile_cache(directory: str):
  """Keeps compiled programs in `directory` (JAX's persistent compilation cache), so a rerun
  loads the train step rather than compiling it again: seconds on CPU, minutes for a large
  model on a pod. JAX keeps compiles of 1 s or more, keyed by program, flags and versions, and
  writes from process 0 only; an entry it cannot read is compiled afresh."""
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.monitoring.register_event_duration_secs_listener(_report_cache_hit)


def _report_cache_hit(event, duration_secs, **kwargs):
  del kwargs
  # JAX stores compile times in whole seconds: small programs report nothing worth saying.
  if event == '/jax/compilation_cache/compile_time_saved_sec' and duration_secs >= 0.5:
    announce(f'Loaded a compiled program from the compile cache ({duration_secs:.1f} s of '
             'compiling saved).')


def announce(message: str):
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)  # above a progress bar, if one is showing
    sys.stdout.flush()  # a process killed next must still have said it
