"""The loop's parts: made in one list in a stated order, and using only what the run offers."""

import pathlib
import re

from tasks import base
from training import parts

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_part_module_is_in_the_one_list_in_a_stated_order():
  modules = {p.stem for p in (REPO / 'training' / 'parts').glob('*.py')} - {'__init__'}
  assert sorted(parts.ORDER) == sorted(modules)
  names = list(parts.ORDER)
  # Producers before their readers: eval/* before early stopping and the test split, every
  # saved state before the checkpointer, every figure before the logger.
  assert names[0] == 'evaluation' and names[-1] == 'metrics_logger'
  assert names.index('early_stopping') < names.index('test_split') < names.index('task')
  assert names.index('plateau') < names.index('checkpointer')
  assert names.index('ema') < names.index('checkpointer')


def test_parts_use_only_what_the_run_offers():
  """A part that reads or sets another attribute of the run is talking to another part through
  it: named results are the way (tasks.base.Part)."""
  offered = set(re.findall(r'\b([a-z_]+)', base.Part.__doc__.split('`run`')[1]))
  sources = [*(REPO / 'training' / 'parts').glob('*.py'), REPO / 'tasks' / 'lm_samples.py',
             REPO / 'tasks' / 'reports.py']
  used = {(path.name, name) for path in sources
          for name in re.findall(r'\brun\.([a-z_]+)', path.read_text())}
  assert {(path, name) for path, name in used if name not in offered} == set()
