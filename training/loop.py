"""The training loop: mesh -> data -> state (new or restored) -> steps, with parts attached.

The loop only runs steps; everything else (evaluation, checkpoints, the non-finite policy,
metrics, early stopping, samples) is a part (`training/parts/`, `tasks.base.Part`), made in one
list by `parts.build` and called in its order; the parts exchange only named results.
"""

import sys
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
from etils import epath
import numpy as np
import tqdm

from data import pipeline, sources
from parallel import sharding
from tasks import base
from training import checkpointing, config_check, exit_codes, parts as parts_lib
from training import step as step_lib
from training import warm_start, watchdog
from training import state as state_lib
from training.parts import checkpointer, data_health

TrainingHalted = parts_lib.TrainingHalted


def train(config, workdir: str, compile_cache: str | None = None, resolved=None) -> int:
  """Trains to `config.train.steps` (or `stop_after`, or an early stop), resuming from `workdir`
  if it has a run. `compile_cache`: a directory for compiled programs, or None. `resolved`: what
  config_check.validate returned. Returns the exit status: exit_codes.DONE, or PREEMPTED when a
  signal stopped it with its step saved.
  """
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh, resolved=resolved)
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
        run = Run(config, workdir, mesh, setup, manager, train_iter, record_stats, eval_batches,
                  test_batches)
        run.train()
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
  """The task's (validation, test) batches, read before anything is written; no test batches
  when the source has no test split."""
  try:
    validation = task.eval_batches()
    try:
      return validation, task.test_batches()
    except sources.SplitAbsent as e:
      announce(f'no test split ({e}): no test/* figures at the end')
      return validation, []
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
  """One training run: the state of the loop, and what parts may ask of it (`tasks.base.Part`
  lists it): config, workdir, mesh, setup, task, manager, train_iter, record_stats, batch_waits,
  eval_step, place_eval, eval_batches (placed on the devices), test_batches (on the host), step,
  state, end, stop(), roll_back(), announce(), loop_state(), part_arrays(), and checkpointer
  (the part that saves, to save now)."""

  def __init__(self, config, workdir, mesh, setup, manager, train_iter, record_stats,
               eval_batches, test_batches):
    self.config, self.workdir, self.mesh, self.setup = config, workdir, mesh, setup
    self.task, self.manager, self.train_iter = setup.task, manager, train_iter
    self.record_stats = record_stats  # the input pipeline's record and batch counts
    self.batch_waits = data_health.BatchWaits()  # the loop's waits for the next batch
    self.train_step, self.eval_step = step_lib.compile_steps(setup, config, mesh)
    rules = config.mesh.rules
    self.place_train = base.batch_placer(self.task.batch_spec('train'), mesh, rules)
    self.place_eval = base.batch_placer(self.task.batch_spec('eval'), mesh, rules)
    self.eval_batches = [self.place_eval(b) for b in eval_batches]  # placed once, kept
    self.test_batches = test_batches  # on the host: placed only when used, once
    self.end = self.step = 0
    self.state = None
    self.stop_reason, self.complete = '', False
    self._rolled_back_to = None
    self.checkpointer = checkpointer.Checkpointer(self)
    self.parts = parts_lib.build(self)

  def exit_status(self) -> int:
    return exit_codes.PREEMPTED if self.checkpointer.preempted else exit_codes.DONE

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

  def part_arrays(self) -> dict:
    """The parts' arrays (before the run starts: their abstract arrays), saved likewise."""
    arrays = {p.name: p.checkpoint_arrays() for p in self.parts if p.name}
    return {name: tree for name, tree in arrays.items() if tree is not None}

  def train(self):
    try:
      state, start = self._start()
      _write_config(self.workdir, self.config)
      return self._train_from(state, start)
    finally:
      for part in self.parts:
        part.close()

  def _start(self):
    """(state, step) to train from: the newest checkpoint's, with the parts' own restored, or
    a new state (from `init_from` if set)."""
    restored = checkpointing.restore_latest(self.manager, self.setup.abstract_state,
                                            self.train_iter, announce, self.part_arrays())
    if restored is None:
      state = state_lib.init_state(self.config, self.setup)
      params = state_lib.count_params(self.setup.abstract_state['params'])
      if self.config.init_from:
        state, loaded = warm_start.load(self.config.init_from, state)
        frozen = self.setup.frozen
        trained = '' if frozen is None else ', {:,} of them trained'.format(sum(
            p.size for p, f in zip(jax.tree.leaves(self.setup.abstract_state['params']),
                                   jax.tree.leaves(frozen)) if not f))
        announce(f'Starting from {self.config.init_from}: {loaded} of the '
                 f'{len(jax.tree.leaves(state["params"]))} parameter arrays loaded, the rest '
                 f'new ({params:,} parameters{trained}).')
      else:
        announce(f'Starting from scratch: {params:,} parameters.')
      return state, 0
    start, state, loop_state, arrays = restored
    announce(f'Resumed from the checkpoint at step {start}.')
    self.step = start
    for part in self.parts:
      if part.name in (loop_state or {}):
        part.restore(self, loop_state[part.name])
      if part.name in (arrays or {}):
        part.restore_arrays(self, arrays[part.name])
    return state, start

  def _train_from(self, state, start):
    config = self.config
    if start >= config.train.steps or self.stop_reason:
      announce(f'Training is already complete: {self.workdir} holds step {start} of '
               f'{config.train.steps}' + (f' ({self.stop_reason})' if self.stop_reason else '')
               + '.')
      return state
    self.end = min(config.train.steps, config.train.stop_after or config.train.steps)
    t = config.train
    with watchdog.Watchdog(t.hang_factor, t.hang_min_seconds,
                           self.manager.wait_until_finished) as dog:
      self.state = state
      for part in self.parts:
        part.at_start(self, state)
      state = self._steps(state, start, dog)
    self.checkpointer.check_saved(self, self.step)
    if self.stop_reason:
      announce(self.stop_reason)
    if self.step == config.train.steps or self.complete:
      results = {}
      for part in self.parts:
        results = {**results, **(part.at_end(self, state, results) or {})}
    return state

  def _steps(self, state, step, dog):
    """Steps after `step` up to `self.end`, reading step N's results only after step N+1 is
    dispatched; returns the final state."""
    previous = None  # (step, results): device arrays, and what parts added on the host
    while step < self.end or previous:
      dog.beat()
      current = None
      if step < self.end:
        step += 1
        if step == self.config.train.debug_hang_at_step:  # fault injection, for the watchdog
          time.sleep(1e6)
        batch = self.batch_waits.next_batch(self.train_iter)
        state, device_metrics = self.train_step(state, self.place_train(batch))
        current = (step, device_metrics)
      self.step, self.state = step, state
      if previous:
        # Scalar arrays become floats; vectors (e.g. health/norms) stay arrays.
        fetched = {k: float(v) if isinstance(v, np.ndarray) and v.ndim == 0 else v
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
          for part in self.parts:
            part.rewind(self, step)
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
  compilation_cache.reset_cache()  # a cache JAX opened already (e.g. from its env variable) closes
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
