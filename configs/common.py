"""Sections every experiment shares, and presets that combine in any order.

An experiment config (`configs/<name>.py`) is `build(task, model)` plus its own values: the
`task`, `model` and `data` sections come from the chosen task and model modules (so only their
keys exist, and an override of a key that does not apply is an error), the rest from here.
"""

import ml_collections

from models import MODELS
from tasks import TASKS
from training import optimizer, parts, precision

# Logical axis -> mesh axes. Each mesh axis is used at most once per array: a later rule for an
# axis already taken leaves that dimension unsharded, which is how activations (batch over
# data+fsdp) and parameters (embed over fsdp) share one table. Names not listed stay unsharded.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),  # the stacked axis of scanned blocks: each device holds every layer
)


def train_config():
  t = ml_collections.ConfigDict()
  t.steps = 600
  t.grad_accum_steps = 1
  t.log_every = 10
  t.eval_every = 100
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.on_save_error = 'warn'  # warn | stop, when a checkpoint cannot be written (e.g. disk full)
  t.stop_after = 0  # stop this run after this step (0: run to `steps`); resuming continues
  parts.NonFinitePolicy.POLICIES.declare(t, 'skip')
  t.spike_sigmas = 0.0  # > 0: also reject a loss this many std devs above its running mean
  t.spike_window = 100  # steps in the running loss statistics; spikes are checked after these
  precision.LOSS_SCALE.declare(t, 'auto')
  # (first step, count): a JAX profiler trace of those steps in WORKDIR/tensorboard, for
  # TensorBoard's Profile tab; (0, 0): off. Process 0 only, unless profile_all_hosts.
  t.profile_steps = (0, 0)
  t.profile_all_hosts = False
  t.hang_factor = 10.0  # a step this many times the median step time is a hang (0: no watchdog)
  t.hang_min_seconds = 300.0  # ... but never less than this
  t.debug_nan_at_step = 0  # fault injection: make this step's loss and gradients NaN
  t.debug_hang_at_step = 0  # fault injection: hang the host loop at this step
  return t


def early_stop_config():
  e = ml_collections.ConfigDict()
  e.metric = ''  # an eval metric of the task, e.g. 'loss' or 'accuracy'; '' turns it off
  e.mode = 'min'  # min | max: whether smaller or larger is better
  e.patience = 3  # evaluations without improvement before stopping
  e.min_delta = 0.0  # an improvement must exceed this
  return e


def health_config():
  h = ml_collections.ConfigDict()
  # Every this many steps: per-layer gradient, parameter and update norms, and the vanishing /
  # exploding gradient detector (training/health.py). 0: off, and the step computes none of it.
  h.every = 0
  h.vanishing_fraction = 1e-4  # a layer whose grad norm is below this x the median's vanishes
  h.exploding_factor = 1e3  # ... above this x the median layer's explodes
  h.growth_factor = 100.0  # ... as does one grown this many times over the last `window` checks
  h.window = 5  # health checks remembered per layer (saved with checkpoints)
  return h


def finetune_config():
  f = ml_collections.ConfigDict()
  f.freeze_backbone = False  # backbone: the parameters `init_from` loaded
  f.backbone_lr_scale = 1.0  # their learning rate, relative to optim.learning_rate
  return f


def mesh_config():
  mesh = ml_collections.ConfigDict()
  # Sizes within a slice (ICI); -1 fills in the devices the other axes leave.
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  # Sizes across slices (DCN) of a multi-slice job; an axis's full size is ici * dcn.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_tensor = 1
  mesh.rules = RULES
  return mesh


def build(task: str, model: str) -> ml_collections.ConfigDict:
  """Every section, with the task's and the model's own keys."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A run (workdir or checkpoint dir) whose parameters start this one; only those that exist
  # there with the same shape are loaded (no optimizer state, no step).
  config.init_from = ''
  config.task = TASKS[task].default_config()
  config.model = MODELS[model].default_config()
  config.data = TASKS[task].default_data_config()
  config.optim = optimizer.section()
  config.train = train_config()
  config.early_stop = early_stop_config()
  config.health = health_config()
  config.finetune = finetune_config()
  config.mesh = mesh_config()
  return config


def parallelism(config, preset) -> bool:
  """The parallelism presets every experiment offers; False if `preset` is not one."""
  mesh = config.mesh
  if preset == 'dp':
    mesh.data, mesh.fsdp, mesh.tensor = -1, 1, 1
  elif preset == 'fsdp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
  elif preset == 'fsdp_tp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 2
  elif preset == 'multislice':  # data parallel across slices, FSDP within each
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
    mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor = -1, 1, 1
  else:
    return False
  return True


PARALLELISM = ('dp', 'fsdp', 'fsdp_tp', 'multislice')


def apply_presets(config, presets: str, order: tuple[str, ...], apply_one):
  """Applies the comma-separated `presets` in the fixed `order` (so any order the user writes
  gives the same config); `apply_one(config, name)` applies one, parallelism ones come last."""
  names = [p for p in presets.split(',') if p]
  known = (*order, *PARALLELISM)
  for name in names:
    if name not in known:
      raise ValueError(f'unknown preset {name!r}; choose from {", ".join(known)}')
  for name in sorted(set(names), key=known.index):
    if not parallelism(config, name):
      apply_one(config, name)
  return config
