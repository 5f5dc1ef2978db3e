"""Early stopping on a validation metric, keeping the best step's parameters."""

import orbax.checkpoint as ocp
from etils import epath

from tasks.base import Part


def improved(value, best, mode: str, min_delta: float) -> bool:
  """Whether `value` beats `best` (None: nothing yet) by more than `min_delta`; mode min|max."""
  sign = 1.0 if mode == 'max' else -1.0
  return best is None or sign * (value - best) > min_delta


class EarlyStopping(Part):
  """Stops when `early_stop.metric` has not improved by `min_delta` for `patience` evals, and
  keeps the best step's parameters apart from the latest checkpoints (`WORKDIR/best/`). When
  training is complete it offers them as the named result `best_state`: (step, a function that
  reads them), if it kept any."""
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

  def after_step(self, run, step, state, results):
    if self.key not in results:
      return None
    value = results[self.key]
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

  def at_end(self, run, state, results):
    if self.best_step:
      return {'best_state': (self.best_step, lambda: self._best_state(run))}
    return None

  def _best_state(self, run):
    """{'params', 'model_state'} of the best step, placed as training places them."""
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


def build(run):
  return [EarlyStopping(run)] if run.config.early_stop.metric else []
