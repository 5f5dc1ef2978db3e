"""An exponential moving average of the parameters (`train.ema_decay`), evaluated and exported."""

import jax
import orbax.checkpoint as ocp
from etils import epath

from tasks.base import Part
from training.parts import evaluation


def _update(average, params, *, decay):
  return jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, params)


class ParameterEMA(Part):
  """train.ema_decay > 0: after every step, average = decay * average + (1 - decay) * params,
  starting from the parameters training starts from (fresh, `init_from`'s, or the checkpoint's
  average on a resume). The average lives on the devices, sharded like the parameters, and is
  saved with every checkpoint (its `parts` item), so a resumed run goes on bit for bit.

  At every evaluation it is evaluated too, on the validation split (eval_ema/*; the model state,
  e.g. BatchNorm statistics, is training's). When training is complete it is written to
  WORKDIR/ema/ as a run of its own (its config.json and state/, where warm_start.state_dir
  looks), which `--config.init_from=WORKDIR/ema` and the sampling and Hugging Face export tools
  with `--workdir=WORKDIR/ema` read. A rollback (train.nonfinite_policy) leaves it as it is."""
  name = 'ema'

  def __init__(self, run):
    self.decay = run.config.train.ema_decay
    self.average = run.setup.abstract_state['params']  # abstract until the run starts
    self.restored = False
    shardings = run.setup.shardings['params']
    self.update = jax.jit(lambda a, p: _update(a, p, decay=self.decay), donate_argnums=0,
                          out_shardings=shardings)

  def at_start(self, run, state):
    if not self.restored:
      self.average = jax.tree.map(lambda x: x.copy(), state['params'])  # the next step donates

  def after_step(self, run, step, state, results):
    self.average = self.update(self.average, state['params'])
    if 'eval' not in results:  # evaluated when the evaluator evaluates
      return None
    evaluated = evaluation.evaluate(run, {**state, 'params': self.average}, run.eval_batches,
                                    step, 'ema')
    return {**{f'eval_ema/{k}': v for k, v in evaluated.figures.items()}, 'eval_ema': evaluated,
            'seconds': evaluation.with_seconds(results, 'eval_ema', evaluated.seconds)}

  def checkpoint_arrays(self):
    return self.average

  def restore_arrays(self, run, arrays):
    self.average, self.restored = arrays, True

  def at_end(self, run, state, results):
    workdir = epath.Path(run.workdir)
    kept = {'params': self.average,
            **({'model_state': state['model_state']} if 'model_state' in state else {})}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / 'ema' / 'state', kept, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
      (workdir / 'ema' / 'config.json').write_text((workdir / 'config.json').read_text())
    run.announce(f'The average of the parameters (train.ema_decay={self.decay}) is in '
                 f'{workdir / "ema"}.')


def build(run):
  return [ParameterEMA(run)] if run.config.train.ema_decay else []


def validate(config):
  decay = config.train.ema_decay
  if not 0 <= decay < 1:
    raise ValueError(f'train.ema_decay: must be in [0, 1) (0: off), got {decay}')
