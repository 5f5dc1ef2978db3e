"""The training loop: mesh -> data -> state (new or restored) -> steps with logs, evals, saves."""

import contextlib
import os
import sys
import time

import jax
import tqdm

from data import pipeline, sources
from models import flops
from hardware import chips
from parallel import sharding
from training import checkpointing, config_check, metrics, preemption, sampling
from training import step as step_lib
from training import watchdog
from training import state as state_lib


def train(config, workdir: str, compile_cache: str | None = None):
  """Trains to `config.train.steps` (or `stop_after`), resuming from `workdir` if it has a run.

  `compile_cache`: a directory for compiled programs (`use_compile_cache`), or None.
  """
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  for line in sharding.unsharded_params(setup.param_template, mesh, config.mesh.rules):
    _announce(f'WARNING: {line}')
  try:
    train_source = sources.make_source(config.data, 'train')
  except ValueError as e:  # no files match, unknown dataset
    raise config_check.ConfigError(str(e)) from None
  if compile_cache:  # only now: a run refused for its config must write nothing
    use_compile_cache(compile_cache)
  record_stats = pipeline.RecordStats()
  train_iter = iter(_batches(config, train_source, shuffle=True, stats=record_stats))
  manager = checkpointing.make_manager(workdir, config.train)
  try:
    with sharding.activate(mesh, config.mesh.rules):
      return _train_from_checkpoint(config, workdir, mesh, setup, manager, train_iter,
                                    record_stats)
  finally:
    manager.close()  # waits for a save still being written
    train_iter.close()


def _train_from_checkpoint(config, workdir, mesh, setup, manager, train_iter, record_stats):
  state, start = _restore_or_init(config, setup, manager, train_iter)
  _write_config(workdir, config)
  if start >= config.train.steps:
    _announce(f'Training is already complete: {workdir} holds step {start} of '
              f'{config.train.steps}.')
    return state
  end = min(config.train.steps, config.train.stop_after or config.train.steps)
  run = _StepLoop(config, workdir, setup, mesh, manager, train_iter, record_stats, start)
  state, last = run.steps(state, start, end)
  if last == config.train.steps and config.train.num_samples:
    _print_samples(config, setup, state)
  return state


_MIN_RECORDS_FOR_BAD_FRACTION = 100  # too few records make the fraction noise


class TrainingHalted(RuntimeError):
  """The non-finite policy `stop` fired; the message names the step and what went wrong."""


class _StepLoop:
  """Runs steps, reading step N's results only after step N+1 is dispatched."""

  def __init__(self, config, workdir, setup, mesh, manager, train_iter, record_stats, start):
    self.config, self.setup, self.manager, self.train_iter = config, setup, manager, train_iter
    self.record_stats, self.reported_bad = record_stats, 0
    self.train_step, self.eval_step = step_lib.compile_steps(setup, config, mesh)
    self.to_global = _batch_placer(config, mesh)
    self.eval_set = [self.to_global(b) for b in _eval_batches(config)]
    self.writer = metrics.MetricsWriter(workdir, resumed_step=start)
    self.progress = metrics.Progress(start, config.train.steps)
    self.throughput = _Throughput(config, mesh, start)
    self.rolled_back_for = set()

  def steps(self, state, step, end):
    """Steps after `step` up to `end`; returns the state and the last step taken."""
    previous = None  # (step, device metrics, whether to log them)
    t = self.config.train
    try:
      with preemption.PreemptionWatcher(self.manager) as watcher, \
          watchdog.Watchdog(t.hang_factor, t.hang_min_seconds) as dog:
        while step < end or previous:
          dog.beat()
          current = None
          if step < end:
            step += 1
            if step == t.debug_hang_at_step:  # fault injection, for testing the watchdog
              time.sleep(1e6)
            state, step_metrics = self.train_step(state, self.to_global(next(self.train_iter)))
            current = self._with_eval(step, end, state, step_metrics)
          if previous:
            rolled_back = self._check(previous, state, step)
            if rolled_back:
              state, step, previous = rolled_back, int(rolled_back['step']), None
              continue
            if previous[2]:
              self._log(*previous[:2])
          previous = current
          if current and self._save(step, state, end, watcher):
            end = step  # preempted: finish the bookkeeping of this step, then stop
    finally:
      self.progress.close()
      self.writer.close()
    return state, step

  def _with_eval(self, step, end, state, step_metrics):
    t = self.config.train
    due = step % t.log_every == 0 or step == end
    if self.eval_set and t.eval_every and (step % t.eval_every == 0 or step == end):
      eval_loss = sum(self.eval_step(state['params'], b) for b in self.eval_set)
      return step, {**step_metrics, 'eval/loss': eval_loss / len(self.eval_set)}, True
    return step, step_metrics, due

  def _save(self, step, state, end, watcher) -> bool:
    """Saves when due; returns True when preempted (after the save has finished)."""
    preempted = watcher.should_stop(step)
    final = step == end or preempted
    with self._save_errors(step):
      checkpointing.save(self.manager, step, state, self.train_iter,
                         self.config.train.checkpoint_every, final=final)
    if final:
      with self._save_errors(step):
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
    if preempted:
      self.progress.write(f'{watcher.signal_name or "Preemption"} received: saved step {step} '
                          f'to {self.manager.directory / str(step)}; rerun to resume.')
    return preempted

  @contextlib.contextmanager
  def _save_errors(self, step):
    """A failed checkpoint write (disk full, storage down) warns or stops, as configured."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except; whatever the storage raised
      message = (f'checkpoint write failed (noticed at step {step}; {type(e).__name__}: '
                 f'{" ".join(str(e).split())[:300]}); earlier checkpoints are intact')
      if self.config.train.on_save_error == 'stop':
        raise TrainingHalted(message) from e
      self.progress.write(f'WARNING: {message}; training continues')

  def _check(self, previous, state, step):
    """Applies the non-finite policy to the previous step; returns a rolled-back state or None."""
    bad_step, step_metrics, _ = previous
    guard = {k: bool(v) for k, v in jax.device_get(step_metrics).items() if k.startswith('guard/')}
    if guard['guard/accept']:
      return None
    what = ', '.join(k for k in ('nonfinite_loss', 'nonfinite_grads', 'loss_spike')
                     if guard[f'guard/{k}'])
    policy = self.config.train.nonfinite_policy
    if policy == 'stop':
      checkpointing.save(self.manager, step, state, self.train_iter, 1, final=True)
      self.manager.wait_until_finished()
      raise TrainingHalted(f'step {bad_step}: {what} (train.nonfinite_policy=stop); the update '
                           f'was not applied and step {step} is saved in {self.manager.directory}')
    self.progress.write(f'step {bad_step}: {what}; update skipped')
    if policy == 'rollback' and bad_step not in self.rolled_back_for:
      self.rolled_back_for.add(bad_step)  # once: if the step fails again, skipping it is all
      return self._rollback(bad_step)
    return None

  def _rollback(self, bad_step):
    restored = checkpointing.restore_before(self.manager, bad_step, self.setup.abstract_state)
    if restored is None:
      self.progress.write('no checkpoint before it to roll back to; continuing')
      return None
    self.writer.rewind(int(restored['step']))
    self.progress.write(f'rolled back to step {int(restored["step"])}; its data is skipped')
    return restored

  def _check_data(self):
    """Reports newly skipped records; stops when too large a share of them is unusable."""
    stats, limit = self.record_stats, self.config.data.max_bad_fraction
    if stats.bad > self.reported_bad:
      self.progress.write(f'data: skipped {stats.bad} unusable of {stats.seen} records read, '
                          f'e.g. {stats.examples[0]}')
      self.reported_bad = stats.bad
    if stats.seen >= _MIN_RECORDS_FOR_BAD_FRACTION and stats.bad_fraction > limit:
      raise TrainingHalted(f'data: {stats.bad} of {stats.seen} records read were unusable '
                           f'({stats.bad_fraction:.1%} > data.max_bad_fraction={limit}), e.g. '
                           f'{"; ".join(stats.examples)}')

  def _log(self, step, device_metrics):
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    values.update(self.throughput.update(step))
    values['data/bad_records'] = self.record_stats.bad
    values['data/bad_fraction'] = self.record_stats.bad_fraction
    self.writer.write(step, values)
    self._check_data()
    self.progress.update(step, values)
    if 'eval/loss' in values:
      self.progress.write(f"step {step}: train/loss {values['train/loss']:.4f}  "
                          f"eval/loss {values['eval/loss']:.4f}")


class _Throughput:
  """Tokens/s, and per device: tokens/s, analytic model TFLOP/s and MFU, between logged steps."""

  def __init__(self, config, mesh, step):
    self._step, self._time = step, time.perf_counter()
    self._tokens_per_step = config.data.global_batch_size * config.data.seq_len
    self._flops_per_token = flops.train_flops_per_token(config.model, config.data.seq_len)
    self._devices = mesh.size
    self._peak = chips.peak_flops_per_device(mesh.devices.flat[0])  # CPU: measured, ~1 s

  def update(self, step) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._step) * self._tokens_per_step / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    flops_per_device = rate * self._flops_per_token / self._devices
    return {'tokens_per_second': rate, 'perf/tokens_per_second_per_device': rate / self._devices,
            'perf/model_tflops_per_device': flops_per_device / 1e12,
            'perf/mfu': flops_per_device / self._peak}


def _restore_or_init(config, setup, manager, train_iter):
  restored = checkpointing.restore_latest(manager, setup.abstract_state, train_iter)
  if restored is None:
    _announce(f'Starting from scratch: {state_lib.count_params(setup.abstract_state["params"]):,} '
              'parameters.')
    return state_lib.init_state(config, setup), 0
  step, state = restored
  _announce(f'Resumed from the checkpoint at step {step}.')
  return state, step


def _batches(config, source, shuffle, stats=None):
  """This process's rows of each global batch: those of the data streams it owns."""
  d = config.data
  num_streams = d.num_streams or jax.process_count()
  per_process = num_streams // jax.process_count()
  first = jax.process_index() * per_process
  return pipeline.batches(
      source, seq_len=d.seq_len, batch_size=d.global_batch_size // jax.process_count(),
      seed=d.shuffle_seed, shuffle=shuffle, streams=range(first, first + per_process),
      num_streams=num_streams, worker_threads=d.worker_threads,
      prefetch_batches=d.prefetch_batches, stats=stats)


def _eval_batches(config) -> list[dict]:
  """A fixed validation set: the first `eval_batches` batches of the eval split."""
  if not (config.train.eval_every and config.train.eval_batches):
    return []
  eval_iter = iter(_batches(config, sources.make_source(config.data, 'eval'), shuffle=False))
  out = [next(eval_iter) for _ in range(config.train.eval_batches)]
  eval_iter.close()
  return out


def _batch_placer(config, mesh):
  batch_sharding = sharding.logical_sharding(mesh, config.mesh.rules, 'batch', 'length')
  return lambda batch: jax.make_array_from_process_local_data(batch_sharding, batch['tokens'])


def _write_config(workdir, config):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))


def _print_samples(config, setup, state):
  t = config.train
  prompts = [t.sample_prompts[i % len(t.sample_prompts)] for i in range(t.num_samples)]
  texts = sampling.generate(setup, state['params'], prompts, max_len=config.model.max_len,
                            new_tokens=t.sample_length, temperature=t.sample_temperature,
                            seed=config.seed)
  for text in texts:
    _announce(f'--- sample ---\n{text}')


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
    _announce(f'Loaded a compiled program from the compile cache ({duration_secs:.1f} s of '
              'compiling saved).')


def _announce(message: str):
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)  # above a progress bar, if one is showing
    sys.stdout.flush()  # a process killed next must still have said it
