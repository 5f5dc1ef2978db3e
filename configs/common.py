"""Sections every experiment shares, and presets that combine in any order.

An experiment config (`configs/<name>.py`) is `build(task, model)` plus its own values: the
`task`, `model` and `data` sections come from the chosen task and model modules (so only their
keys exist, and an override of a key that does not apply is an error), the rest from here.
"""

import ml_collections

from models import MODELS
from tasks import TASKS

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


def optim_config():
  o = ml_collections.ConfigDict()
  # The optimiser, and its own keys in the section of the same name below (defaults: Optax's,
  # but Adam's and AdamW's b2 and AdamW's decay suit LMs). Weight decay is decoupled and masked
  # off norms, biases and embeddings. A key of an optimiser not chosen is an error if changed.
  o.name = 'adamw'  # sgd | adam | adamw | adagrad | adadelta | adamax | rmsprop | lion |
  #                   adafactor | lamb | muon
  o.sgd = dict(momentum=0.9, nesterov=False)  # momentum 0: plain SGD, no momentum buffer
  o.adam = dict(b1=0.9, b2=0.95, eps=1e-8)
  o.adamw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  o.adagrad = dict(initial_accumulator_value=0.1, eps=1e-7)
  o.adadelta = dict(rho=0.9, eps=1e-6, weight_decay=0.0)
  o.adamax = dict(b1=0.9, b2=0.999, eps=1e-8)
  o.rmsprop = dict(decay=0.9, eps=1e-8, centered=False, momentum=0.0, nesterov=False)
  o.lion = dict(b1=0.9, b2=0.99, weight_decay=1e-3)
  o.adafactor = dict(decay_rate=0.8, clipping_threshold=1.0, multiply_by_parameter_scale=True,
                     min_dim_size_to_factor=128, eps=1e-30, weight_decay=0.0)
  o.lamb = dict(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0)
  # Muon orthogonalises 2-D matmul kernels; everything else takes AdamW(adam_b1, adam_b2).
  o.muon = dict(beta=0.95, ns_steps=5, nesterov=True, eps=1e-8, weight_decay=0.0, adam_b1=0.9,
                adam_b2=0.999)
  o.learning_rate = 3e-3  # the peak rate, reached after a linear warmup from 0
  o.warmup_steps = 50
  # After warmup: constant | linear | cosine | exponential | inverse_time | step | polynomial |
  # warmup_stable_decay | one_cycle | cyclic | reduce_on_plateau. The keys below say which
  # schedules read them; one that the chosen schedule does not read is an error if changed.
  o.schedule = 'cosine'
  o.final_lr_fraction = 0.1  # cosine, linear, polynomial, warmup_stable_decay end at lr * this
  o.decay_rate = 0.5  # exponential: lr halves every `decay_steps`
  o.decay_steps = 1000
  o.inverse_time_b = 0.01  # inverse_time: lr0 / (1 + b*t)^g, t counted after warmup
  o.inverse_time_power = 0.5
  o.step_boundaries = (0.5, 0.75)  # step: at these fractions of the steps after warmup, ...
  o.step_factors = (0.1, 0.1)  # ... the rate is multiplied by these
  o.polynomial_power = 1.0  # polynomial: lr -> lr * final_lr_fraction as (1 - t/T)^power
  o.decay_fraction = 0.2  # warmup_stable_decay: the last fraction of steps decays linearly
  o.one_cycle_pct_start = 0.3  # one_cycle (cosine): fraction of steps rising to the peak ...
  o.one_cycle_div_factor = 25.0  # ... from lr / this, then falling to lr / div / final_div
  o.one_cycle_final_div_factor = 1e4
  o.cycle_steps = 2000  # cyclic (triangular): one period, falling then rising, ...
  o.cycle_min_fraction = 0.1  # ... between lr * this and lr
  # reduce_on_plateau: a constant rate, multiplied by `factor` when the eval `metric` has not
  # improved by more than `min_delta` for more than `patience` evaluations, then left alone
  # for `cooldown` evaluations (PyTorch's ReduceLROnPlateau). The multiplier is optimizer state.
  o.plateau = dict(metric='loss', mode='min', patience=2, factor=0.5, cooldown=0, min_delta=0.0)
  # Gradient clipping: global_norm (to `grad_clip_norm`) | value (each element to
  # +-`grad_clip_value`) | adaptive (unit-wise, to `grad_clip_factor` x the parameter's norm;
  # Brock et al. 2021) | none.
  o.grad_clip = 'global_norm'
  # Penalties added to the loss (coupled, unlike weight decay), on the kernels weight decay
  # applies to:
  o.l2_penalty = 0.0  # + l2_penalty / 2 * sum(w^2)
  o.l1_penalty = 0.0  # + l1_penalty * sum(|w|)
  o.grad_clip_norm = 1.0
  o.grad_clip_value = 1.0
  o.grad_clip_factor = 0.01
  return o


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
  # > 0: also keep an average of the parameters, avg = ema_decay * avg + (1 - ema_decay) * params
  # after each step; evaluated as eval_ema/*, written to WORKDIR/ema/ at the end. 0: off.
  t.ema_decay = 0.0
  t.nonfinite_policy = 'skip'  # skip | rollback | stop, for non-finite loss/grads or a spike
  t.spike_sigmas = 0.0  # > 0: also reject a loss this many std devs above its running mean
  t.spike_window = 100  # steps in the running loss statistics; spikes are checked after these
  # auto (dynamic with model.dtype=float16) | dynamic | none; training/precision.py
  t.loss_scale = 'auto'
  t.loss_scale_init = 2.0**15
  t.loss_scale_period = 2000  # finite steps in a row before the scale doubles
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
  config.optim = optim_config()
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
