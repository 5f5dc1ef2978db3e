"""Evaluates a run's checkpoint on one split without training: `train.py --mode=evaluate`.

The task's eval figures (the same sums and figures training logs as eval/* and test/*) for the
parameters of one checkpoint: the newest, step N, or the best step early stopping kept in
WORKDIR/best/. Sharded like training, on the config's mesh; every process reads its rows and
process 0 prints the figures and writes them to WORKDIR/evaluations/SPLIT-STEP.json.
A LoRA run is evaluated with its adapters, or with them merged into the kernels (`merge_lora`:
the plain model that `python -m tools.hf export` writes).
"""

import json

import jax
from etils import epath

from data import sources
from models import lora
from parallel import sharding
from tasks import base
from training import step as step_lib
from training import state as state_lib
from training import warm_start
from training.parts import evaluation

SPLITS = ('validation', 'test')


class EvaluateError(ValueError):
  """The workdir has no checkpoint to evaluate, or the task has no such split."""


def checkpoint_dir(workdir: str, step: str) -> tuple[epath.Path, int]:
  """(folder of the chosen checkpoint, its step) for `step`: '' the newest, 'best', or 'N'."""
  root = epath.Path(workdir) / ('best' if step == 'best' else 'checkpoints')
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
  if not steps:
    what = 'no best/ checkpoint (early stopping was off)' if step == 'best' else 'no checkpoint'
    raise EvaluateError(f'--workdir: {workdir} holds {what}')
  if step in ('', 'best'):
    return root / str(steps[-1]), steps[-1]
  if int(step) not in steps:
    raise EvaluateError(f'--step={step}: {workdir} holds steps {", ".join(map(str, steps))}')
  return root / step, int(step)


def _batches(task, split: str) -> list:
  try:
    batches = task.eval_batches() if split == 'validation' else task.test_batches()
  except sources.SplitAbsent as e:
    raise EvaluateError(f'--split={split}: the run has no {split} split: {e}') from None
  except ValueError as e:  # the split is missing or unreadable
    raise EvaluateError(str(e)) from None
  if not batches:
    raise EvaluateError(f'--split={split}: task {task.config.task.name} has no {split} split'
                        + (' (task.eval_batches is 0)' if split == 'validation' else ''))
  return batches


def _params(setup, folder: epath.Path) -> dict:
  """The checkpoint's params (and model state), placed as training places them."""
  wanted = {k: v for k, v in setup.abstract_state.items() if k in ('params', 'model_state')}
  state, loaded = warm_start.load(str(folder), wanted)
  expected = len(jax.tree.leaves(wanted))
  if loaded != expected:
    raise EvaluateError(f"--workdir: {folder} has {loaded} of the model's {expected} arrays; "
                        'is it a run of this config?')
  return state


def _merged(config, state: dict, mesh, resolved) -> tuple[state_lib.Setup, dict]:
  """(the setup of the model without adapters, `state` with the adapters merged into it)."""
  merged = lora.merge(state['params'], lora.model_config(config.model, config.finetune))
  config = config.copy_and_resolve_references()
  config.finetune.lora_rank = 0
  setup = state_lib.make_setup(config, mesh, resolved=resolved)
  return setup, {**state, 'params': jax.device_put(merged, setup.shardings['params'])}


def evaluate(config, workdir: str, split: str, step: str, resolved=None,
             merge_lora: bool = False) -> dict:
  """The task's eval figures on `split` for the checkpoint `step` picks (see checkpoint_dir),
  written to WORKDIR/evaluations/ and returned with the step they are of. `config` needs
  `train.eval_every` > 0 (tasks build no eval set without it); `resolved`: validation's.
  `merge_lora`: evaluate a LoRA run with its adapters merged into the kernels."""
  mesh = sharding.make_mesh(config.mesh)
  config = config.copy_and_resolve_references()
  config.init_from = ''  # the model is all it needs: not the backbone init_from held
  setup = state_lib.make_setup(config, mesh, resolved=resolved)
  batches = _batches(setup.task, split)
  folder, step_number = checkpoint_dir(workdir, step)
  try:
    state = _params(setup, folder)
  except warm_start.InitFromError as e:
    raise EvaluateError(str(e).replace('init_from: ', '--workdir: ')) from None
  if merge_lora:
    if not config.finetune.get('lora_rank'):
      raise EvaluateError('--merge_lora: the run has no LoRA adapters (finetune.lora_rank=0)')
    setup, state = _merged(config, state, mesh, resolved)
  _, eval_step = step_lib.compile_steps(setup, config, mesh)
  place = base.batch_placer(setup.task.batch_spec('eval'), mesh, config.mesh.rules)
  with sharding.activate(mesh, config.mesh.rules):
    summed = evaluation.sums(eval_step, state, [place(batch) for batch in batches])
  figures = {k: float(v) for k, v in setup.task.eval_metrics(summed).items()}
  result = {'split': split, 'step': step_number, 'checkpoint': str(folder), **figures}
  name = f'{split}-{step_number}' + ('-merged' if merge_lora else '')
  if jax.process_index() == 0:
    out = epath.Path(workdir) / 'evaluations'
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(result, indent=2) + '\n')
  return result
