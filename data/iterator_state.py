"""A data iterator's saved position, one per process, taken back by a run on any number of
processes.

Pipelines whose state is the same on every process (the classifier's and the masked LM's)
resume on any number of processes. The LM's names its streams ({'num_streams', 'streams'},
data/pipeline.py): each process takes the positions of the streams it owns now, so the global
batches go on exactly as before whenever the streams can be shared out (`data.num_streams` fixed
and divisible by the new process count).
"""

import jax


class ResumeError(ValueError):
  """A saved data position that this run's processes cannot take; the message says why."""


def merged(states: list, checkpoint) -> dict | list:
  """One state from every saving process's (in `checkpoint`, a folder named in errors)."""
  try:
    return _merge(states)
  except ValueError:
    raise ResumeError(
        f'the checkpoint in {checkpoint} holds a data position per process that this run '
        f'cannot divide: resume it on {len(states)} processes') from None


def _merge(states: list):
  """Stream positions pooled, all else equal on every process (ValueError otherwise)."""
  first = states[0]
  if all(s == first for s in states):
    return first
  if all(isinstance(s, dict) and s.keys() == first.keys() for s in states):
    if 'num_streams' in first:
      if any(s['num_streams'] != first['num_streams'] for s in states):
        raise ValueError('different stream counts')
      return {**first, 'streams': {k: v for s in states for k, v in s['streams'].items()}}
    return {k: _merge([s[k] for s in states]) for k in first}
  if all(isinstance(s, list) and len(s) == len(first) for s in states):
    return [_merge(list(column)) for column in zip(*states)]
  raise ValueError('states differ')


def _streams_of(state):
  """The {'num_streams', 'streams'} part of an iterator state, or None."""
  if isinstance(state, dict):
    if 'num_streams' in state:
      return state
    found = [_streams_of(v) for v in state.values()]
  elif isinstance(state, list):
    found = [_streams_of(v) for v in state]
  else:
    return None
  return next((f for f in found if f is not None), None)


def check(saved, current, checkpoint):
  """ResumeError unless `saved` has a position for each stream `current` reads."""
  now = _streams_of(current)
  if now is None:
    return
  then = _streams_of(saved)
  if then is None:
    raise ResumeError(
        f'the checkpoint in {checkpoint} saved its data position in an older format; resume '
        'it with the podium version that wrote it')
  count = then['num_streams']
  if count != now['num_streams']:
    hint = ('' if count % jax.process_count() == 0 else
            f', on a number of processes that divides {count}')
    raise ResumeError(
        f'data.num_streams: the checkpoint in {checkpoint} read the data in {count} stream(s) '
        f'and this run would read {now["num_streams"]} (0 means one per process); resume with '
        f'--config.data.num_streams={count}{hint}')
  missing = sorted(now['streams'].keys() - then['streams'].keys(), key=int)
  if missing:
    raise ResumeError(
        f'the checkpoint in {checkpoint} has no position for data streams {", ".join(missing)}')
