"""Orbax checkpoints holding the train state, the data iterator's position and the loop parts'
state (e.g. early stopping's patience, as JSON, in `loop`; arrays such as an average of the
parameters, sharded, in `parts`), saved together.

Saves are asynchronous: `save` copies arrays off the devices and returns while a background
thread writes them, so the next steps (which donate the state's buffers) can start at once.
"""

import dataclasses
import json
import logging as pylogging
import os
import sys
import time
import traceback
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils as multihost

from data import iterator_state


def make_manager(workdir, train_config, asynchronous=True) -> ocp.CheckpointManager:
  _drop_closed_loop_reports()
  _quiet_orbax_errors()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_config.keep_checkpoints,
      enable_async_checkpointing=asynchronous,
      cleanup_tmp_directories=True,  # a write that died (crash, disk full) frees its space
      create=True)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'data': DataIteratorHandler(),
              'loop': ocp.JsonCheckpointHandler(),
              'parts': ocp.StandardCheckpointHandler()}
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options,
                               item_handlers=handlers)


def _is_closed_loop_report(kind, error, tb) -> bool:
  frames = traceback.extract_tb(tb)
  return (kind is RuntimeError and str(error) == 'Event loop is closed' and bool(frames)
          and frames[0].name == 'call_soon_threadsafe')


def _drop_closed_loop_reports():
  """Keeps TensorStore from printing a traceback for each read or write still running when a
  save or a restore fails.

  Orbax closes the operation's event loop as soon as one of its reads or writes fails; those
  still running then finish into the closed loop, and TensorStore reports each (`RuntimeError:
  Event loop is closed`, raised in `call_soon_threadsafe` called from C) through
  `sys.excepthook` or `sys.unraisablehook`: thousands of times for a truncated checkpoint, up to
  the process's last line. The failure itself is reported once, by `save` or `restore_latest`.
  """
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(kind, error, tb):
    if not _is_closed_loop_report(kind, error, tb):
      previous(kind, error, tb)

  def unraisable_hook(report):
    if not _is_closed_loop_report(report.exc_type, report.exc_value, report.exc_traceback):
      previous_unraisable(report)

  hook.drops_closed_loop_reports = True
  sys.excepthook, sys.unraisablehook = hook, unraisable_hook


class _OrbaxErrorFilter(pylogging.Filter):
  """Orbax logs a failed write's error, with its traceback, from each thread it passes through
  (four to eight tracebacks per failure), and asyncio logs each read a failed restore abandoned
  ("Task exception was never retrieved"; asyncio runs only Orbax's reads and writes here). The
  loop reports the failure once, in one line, so these are left out below --verbosity=1."""

  def filter(self, record):
    abandoned = record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg)
    return not (record.levelno >= pylogging.ERROR
                and logging.get_verbosity() < logging.DEBUG
                and (f'{os.sep}orbax{os.sep}' in record.pathname or abandoned))


def _quiet_orbax_errors():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OrbaxErrorFilter) for f in handler.filters):
    handler.addFilter(_OrbaxErrorFilter())


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, every: int,
         final: bool, loop_state: dict | None = None, arrays: dict | None = None) -> bool:
  """Saves on every `every`-th step and the final one; returns whether a save started.
  `loop_state`: the parts' JSON-able state; `arrays`: their arrays (part name -> pytree)."""
  if step % every and not final:
    return False
  items = {'state': ocp.args.StandardSave(state),
           'data': DataIteratorSave(data_iterator)}
  if loop_state:
    items['loop'] = ocp.args.JsonSave(loop_state)
  if arrays:
    items['parts'] = ocp.args.StandardSave(arrays)
  args = ocp.args.Composite(**items)
  return manager.save(step, args=args, force=True)


def raise_failed_save(manager: ocp.CheckpointManager):
  """Raises the error of a background save that failed, once Orbax has finished with that save.

  Cheap enough for every step, and never waits for a save still being written. It must not ask
  sooner (`manager.check_for_errors()` would): Orbax keeps the write's error in one slot, and
  whoever reads it first clears it. When that is not Orbax's own finalize thread, the thread takes
  the failed save for a good one and deletes the checkpoints it was to replace (`max_to_keep`),
  the last complete one included.
  """
  if not manager.is_saving_in_progress():
    manager.wait_until_finished()  # the save is done: returns at once, raising what it raised


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none can be read; starting over would discard the user's run."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator, announce=print,
                   abstract_arrays: dict | None = None):
  """(step, state, loop state or None, parts' arrays or None) from the newest readable
  checkpoint, moving `data_iterator` to match. `abstract_arrays`: the parts' arrays to read (part
  name -> pytree of jax.ShapeDtypeStructs); those of a checkpoint saved without them are None.

  Returns None when there are no checkpoints. Unreadable checkpoints newer than the one restored
  are moved aside into `checkpoints_unreadable/` (never deleted), each `announce`d in one line.
  When none is readable, nothing is moved: NoUsableCheckpointError, on this run and every rerun,
  until a person decides.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    _check_shapes(manager, step, abstract_state)
    try:
      restored = _restore(manager, step, abstract_state, data_iterator, abstract_arrays)
    except IncompatibleCheckpointError:
      raise  # readable, but not by this run: the user must say how to go on
    except Exception as e:  # pylint: disable=broad-except; any failure to read means unusable
      unreadable.append((step, f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:160]}'))
      continue
    for bad, reason in unreadable:
      aside = _set_aside(manager, bad, 'checkpoints_unreadable')
      announce(f'Skipped the checkpoint at step {bad}: it is unreadable ({reason}); moved it to '
               f'{aside}.')
    return restored
  if steps:
    step, reason = unreadable[0]
    raise NoUsableCheckpointError(
        f'none of the checkpoints {steps} in {manager.directory} can be read (step {step}: '
        f'{reason}); refusing to start over. To start over, move {manager.directory} away; to '
        'resume, put a readable checkpoint back in it.')
  return None


def _restore(manager, step, abstract_state, data_iterator, abstract_arrays):
  items = {'state': ocp.args.StandardRestore(abstract_state),
           'data': DataIteratorRestore(data_iterator)}
  if (manager.directory / str(step) / 'loop').exists():
    items['loop'] = ocp.args.JsonRestore()
  if abstract_arrays and (manager.directory / str(step) / 'parts').exists():
    items['parts'] = ocp.args.StandardRestore(abstract_arrays)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return (step, restored['state'], restored['loop'] if 'loop' in items else None,
          restored['parts'] if 'parts' in items else None)


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a differently shaped model or optimizer, or its
  data position cannot be given to this run's processes."""


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's handler (each process saves its iterator's state as `process_I-of-N.json`), made
  elastic: a run resumed on another number of processes merges the states of all the processes
  that saved, and each process takes its part (data/iterator_state.py says when it can).
  """

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    own = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    try:
      if own.exists():
        saved = json.loads(own.read_text())
      else:
        files = sorted(directory.glob('process_*-of-*.json'))
        if not files:
          raise FileNotFoundError(f'no data iterator state in {directory}')
        saved = iterator_state.merged([json.loads(f.read_text()) for f in files],
                                      directory.parent)
      iterator_state.check(saved, item.get_state(), directory.parent)
    except iterator_state.ResumeError as e:
      raise IncompatibleCheckpointError(str(e)) from None
    item.set_state(saved)
    item.start_prefetch()  # as Grain's handler does: the first batches load while arrays do
    return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Raises IncompatibleCheckpointError unless the saved arrays have the shapes we expect."""
  try:
    saved_tree = manager.item_metadata(step)['state'].tree
  except Exception:  # pylint: disable=broad-except; unreadable: restoring will set it aside
    return
  saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(saved_tree)}
  wanted = {'.'.join(_key_name(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
  for name in sorted(saved.keys() | wanted.keys(), key=lambda n: (not n.startswith('params'), n)):
    if saved.get(name) != wanted.get(name):
      raise IncompatibleCheckpointError(
          f'the checkpoint at step {step} in {manager.directory} does not fit this config: '
          f'{name} is {saved.get(name, "absent")} there and {wanted.get(name, "absent")} here; '
          'use another --workdir or the config that wrote it')


def _key_name(key) -> str:
  """A pytree path entry as Orbax names it: dict key, sequence index or attribute name."""
  for attribute in ('key', 'idx', 'name'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


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
