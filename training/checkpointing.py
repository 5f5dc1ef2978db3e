"""Orbax checkpoints holding the train state and the data iterator's position, saved together.

Saves are asynchronous: `save` copies arrays off the devices and returns while a background
thread writes them, so the next steps (which donate the state's buffers) can start at once.
"""

import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils as multihost


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


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none can be read; starting over would discard the user's run."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator):
  """(step, state) from the newest readable checkpoint, moving `data_iterator` to match.

  Returns None when there are no checkpoints. An unreadable checkpoint is moved aside into
  `checkpoints_unreadable/` (never deleted) and the next older one is tried.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
      return step, restored['state']
    except Exception as e:  # pylint: disable=broad-except; any failure to read means unusable
      aside = _set_aside(manager, step, 'checkpoints_unreadable')
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); moved it to %s and '
                      'trying the one before.', step, type(e).__name__,
                      (str(e).splitlines() or [''])[0][:200], aside)
  if steps:
    raise NoUsableCheckpointError(
        f'none of the checkpoints {steps} in {manager.directory} can be read; they were moved '
        'to checkpoints_unreadable/. Refusing to start over in this workdir.')
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int, folder: str) -> epath.Path:
  """Moves a checkpoint out of the manager's sight, into `folder` beside it."""
  target = manager.directory.parent / folder / f'{step}-{int(time.time())}'
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    (manager.directory / str(step)).rename(target)
  multihost.sync_global_devices(f'set_aside_{step}')
  manager.reload()
  return target


def restore_before(manager: ocp.CheckpointManager, step: int, abstract_state):
  """The train state of the newest checkpoint before `step`, or None; newer ones are set aside.

  The data iterator is deliberately not restored: training goes on with the batches after the
  ones that went wrong.
  """
  earlier = [s for s in manager.all_steps() if s < step]
  if not earlier:
    return None
  for newer in [s for s in manager.all_steps() if s > max(earlier)]:
    _set_aside(manager, newer, 'checkpoints_rolled_back')
  restored = manager.restore(max(earlier), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state']
