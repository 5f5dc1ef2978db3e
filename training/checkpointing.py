"""Orbax checkpoints holding the train state and the data iterator's position, saved together.

Saves are asynchronous: `save` copies arrays off the devices and returns while a background
thread writes them, so the next steps (which donate the state's buffers) can start at once.
"""

import grain
import orbax.checkpoint as ocp
from etils import epath


def make_manager(workdir, train_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_config.keep_checkpoints,
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, every: int,
         final: bool) -> bool:
  """Saves on every `every`-th step and the final one; returns whether a save started."""
  if step % every and not final:
    return False
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=grain.checkpoint.CheckpointSave(data_iterator))
  return manager.save(step, args=args, force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
  """(step, state) from the newest checkpoint, moving `data_iterator` to match; None if none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return step, restored['state']
