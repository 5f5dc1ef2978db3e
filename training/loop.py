"""The training loop: mesh -> data -> state (new or restored) -> steps with logs, evals, saves."""

import os
import time

import jax

from data import pipeline, sources
from parallel import cpu_backend, sharding
from training import checkpointing, config_check, metrics, preemption, sampling
from training import step as step_lib
from training import state as state_lib


def train(config, workdir: str):
  """Trains to `config.train.steps` (or `stop_after`), resuming from `workdir` if it has a run."""
  cpu_backend.tune_malloc()
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  config_check.check_param_shapes(setup.abstract_state['params'], mesh)
  train_iter = iter(_batches(config, sources.make_source(config.data, 'train'), shuffle=True))
  _write_config(workdir, config)
  manager = checkpointing.make_manager(workdir, config.train)
  try:
    with sharding.activate(mesh, config.mesh.rules):
      return _train_from_checkpoint(config, workdir, mesh, setup, manager, train_iter)
  finally:
    manager.close()  # waits for a save still being written
    train_iter.close()


def _train_from_checkpoint(config, workdir, mesh, setup, manager, train_iter):
  state, start = _restore_or_init(config, setup, manager, train_iter)
  if start >= config.train.steps:
    _announce(f'Training is already complete: {workdir} holds step {start} of '
              f'{config.train.steps}.')
    return state
  end = min(config.train.steps, config.train.stop_after or config.train.steps)
  train_step, eval_step = step_lib.compile_steps(setup, config, mesh)
  to_global = _batch_placer(config, mesh)
  eval_set = [to_global(b) for b in _eval_batches(config)]
  state, last = _run_steps(config, workdir, state, start, end, train_iter, to_global,
                           train_step, eval_step, eval_set, manager)
  if last == config.train.steps and config.train.num_samples:
    _print_samples(config, setup, state)
  return state


def _run_steps(config, workdir, state, start, end, train_iter, to_global, train_step, eval_step,
               eval_set, manager):
  """Steps start+1..end. Step N's metrics are read only after step N+1 is dispatched."""
  writer = metrics.MetricsWriter(workdir, resumed_step=start)
  progress = metrics.Progress(start, config.train.steps)
  throughput = _Throughput(start, config.data.global_batch_size * config.data.seq_len)
  pending = None
  with preemption.PreemptionWatcher(manager) as watcher:
    for step in range(start + 1, end + 1):
      state, step_metrics = train_step(state, to_global(next(train_iter)))
      if pending:
        _log(pending, throughput, writer, progress)
      pending = None
      if step % config.train.log_every == 0 or step == end:
        pending = (step, step_metrics)
      if eval_set and config.train.eval_every and (step % config.train.eval_every == 0 or
                                                   step == end):
        eval_loss = sum(eval_step(state['params'], b) for b in eval_set) / len(eval_set)
        pending = (step, {**step_metrics, 'eval/loss': eval_loss})
      preempted = watcher.should_stop(step)
      checkpointing.save(manager, step, state, train_iter, config.train.checkpoint_every,
                         final=step == end or preempted)
      if preempted:
        manager.wait_until_finished()
        progress.write(f'{watcher.signal_name or "Preemption"} received: saved step {step} to '
                       f'{manager.directory / str(step)}; rerun the same command to resume.')
        break
  if pending:
    _log(pending, throughput, writer, progress)
  progress.close()
  writer.close()
  return state, step


def _log(pending, throughput, writer, progress):
  step, device_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  values['tokens_per_second'] = throughput.update(step)
  writer.write(step, values)
  progress.update(step, values)
  if 'eval/loss' in values:
    progress.write(f"step {step}: train/loss {values['train/loss']:.4f}  "
                   f"eval/loss {values['eval/loss']:.4f}")


class _Throughput:
  """Tokens per second between consecutive logged steps."""

  def __init__(self, step, tokens_per_step):
    self._step, self._time, self._tokens_per_step = step, time.perf_counter(), tokens_per_step

  def update(self, step):
    now = time.perf_counter()
    rate = (step - self._step) * self._tokens_per_step / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate


def _restore_or_init(config, setup, manager, train_iter):
  restored = checkpointing.restore_latest(manager, setup.abstract_state, train_iter)
  if restored is None:
    _announce(f'Starting from scratch: {state_lib.count_params(setup.abstract_state["params"]):,} '
              'parameters.')
    return state_lib.init_state(config, setup), 0
  step, state = restored
  _announce(f'Resumed from the checkpoint at step {step}.')
  return state, step


def _batches(config, source, shuffle):
  d = config.data
  return pipeline.batches(
      source, seq_len=d.seq_len, batch_size=d.global_batch_size // jax.process_count(),
      seed=d.shuffle_seed, shuffle=shuffle, shard_index=jax.process_index(),
      shard_count=jax.process_count(), worker_threads=d.worker_threads,
      prefetch_batches=d.prefetch_batches)


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


def _announce(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)
