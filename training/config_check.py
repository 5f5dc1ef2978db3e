"""Validates a config before anything compiles, with one-line errors that name the key; and the
sections of the trainer's own keys (`train`, `early_stop`, `finetune`), declared beside their
checks."""

import dataclasses
import os
import types

import ml_collections

from models import MODELS, lora, platforms
from parallel import sharding
from tasks import TASKS, base
from training import optimizer, parts, precision
from training.parts import nonfinite


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the key's name."""


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The run's choices looked up once: the model module and the task built on it (the task's
  tokenizer, if any, loads once). Validation makes it; state, parts and AOT use it."""
  model: types.ModuleType
  task: base.Task


def resolve(config) -> Resolved:
  """The config's choices, for callers that do not validate it (tests, benchmarks)."""
  model = MODELS[config.model.name]
  return Resolved(model, TASKS[config.task.name].Task(config, model))


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f'{key}: {message}')


def _one_of(config, key: str, choices):
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(value in choices, key, f'{value!r} is not one of {", ".join(map(str, choices))}')


def check_model(config) -> types.ModuleType:
  _one_of(config, 'model.name', sorted(MODELS))
  model = MODELS[config.model.name]
  _from_value_error(lambda: model.validate(config.model, config))
  return model


def check_task(config, model=None) -> base.Task:
  """The task, built on `model` (default: the config's) once its keys are checked."""
  _one_of(config, 'task.name', sorted(TASKS))
  d = config.data
  _require(d.global_batch_size > 0, 'data.global_batch_size', 'must be positive')
  _require(0 <= d.max_bad_fraction <= 1, 'data.max_bad_fraction', 'must be in [0, 1]')
  _require(0 < d.warn_wait_share <= 1, 'data.warn_wait_share', 'must be in (0, 1]')
  _require(d.worker_threads >= 0, 'data.worker_threads', 'must be >= 0 (0: half the CPUs)')
  task = TASKS[config.task.name].Task(config, model or MODELS[config.model.name])
  _from_value_error(task.validate)
  return task


def _from_value_error(check):
  """Runs a model's or task's own check, whose ValueError names the key."""
  try:
    check()
  except ValueError as e:
    raise ConfigError(str(e)) from None


def train_choices():
  """The registered choices of the train section (looked up when called: parts imports this
  module)."""
  return (precision.LOSS_SCALE, nonfinite.NonFinitePolicy.POLICIES)


def registries(config) -> tuple:
  """The registered choices `config` makes: the optimiser's, the train section's, its task's."""
  task_choices = getattr(TASKS.get(config.task.name), 'CHOICES', ())  # e.g. data.source
  return (*optimizer.CHOICES, *train_choices(), *task_choices)


def keep_chosen(config, overridden=()):
  """Keeps only the chosen entries' keys in `config`, after the error for an unknown name or a
  key set that the chosen entries do not read; `overridden`: the keys set on the command line."""
  try:
    config.optim = optimizer.keep_chosen(config.optim, overridden)
    for choice in train_choices():
      choice.check(config.train, overridden)
      config.train = choice.keep_chosen(config.train)
    for choice in getattr(TASKS.get(config.task.name), 'CHOICES', ()):  # e.g. data.source
      choice.check(config.data, overridden)
      config.data = choice.keep_chosen(config.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_optim(config, overridden=()):
  """`overridden`: the keys set on the command line, e.g. {'optim.sgd.momentum'}."""
  def check():
    optim = optimizer.keep_chosen(config.optim, overridden)
    optimizer.validate(optim, config.train.steps, config.train.eval_every)
  _from_value_error(check)


def train_config():
  t = ml_collections.ConfigDict()
  t.steps = 600
  t.grad_accum_steps = 1
  # > 1: local SGD (DiLoCo): each replica (a group of the mesh's data axis: a slice of a
  # multi-slice job with mesh.data=1) takes this many steps on its own, then the replicas average
  # their parameter deltas into the global parameters (optim.outer). 1: synchronous training.
  t.sync_every = 1
  t.log_every = 10
  t.eval_every = 100
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.on_save_error = 'warn'  # warn | stop, when a checkpoint cannot be written (e.g. disk full)
  t.stop_after = 0  # stop this run after this step (0: run to `steps`); resuming continues
  # > 0: also keep an average of the parameters, avg = ema_decay * avg + (1 - ema_decay) * params
  # after each step; evaluated as eval_ema/*, written to WORKDIR/ema/ at the end. 0: off.
  t.ema_decay = 0.0
  nonfinite.NonFinitePolicy.POLICIES.declare(t, 'skip')
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


def finetune_config():
  f = ml_collections.ConfigDict()
  f.freeze_backbone = False  # backbone: the parameters `init_from` loaded
  f.backbone_lr_scale = 1.0  # their learning rate, relative to optim.learning_rate
  # > 0: LoRA, rank-r adapters on the dense layers lora_targets names, trained on the frozen
  # backbone (only the adapters and a new head train); 0: off.
  f.lora_rank = 0
  f.lora_alpha = 16.0  # the adapters' product is scaled by lora_alpha / lora_rank
  # Comma list of attention query, key, value, out and MLP up, gate (swiglu), down.
  f.lora_targets = 'query,value'
  return f


def check_train(config, overridden=()):
  t = config.train
  for key in ('steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'grad_accum_steps'):
    _require(t[key] > 0, f'train.{key}', f'must be positive, got {t[key]}')
  _one_of(config, 'train.on_save_error', ('warn', 'stop'))
  _require(t.spike_sigmas >= 0, 'train.spike_sigmas', f'must be >= 0, got {t.spike_sigmas}')
  _require(t.spike_window > 1, 'train.spike_window', f'must be > 1, got {t.spike_window}')
  _require(t.hang_factor == 0 or t.hang_factor > 1, 'train.hang_factor', 'must be 0 (off) or > 1')
  _require(t.hang_min_seconds > 0, 'train.hang_min_seconds', 'must be positive')
  for choice in train_choices():
    _from_value_error(lambda choice=choice: (choice.check(t, overridden), choice.validate(t)))
  _require(t.sync_every >= 1, 'train.sync_every',
           f'must be >= 1 (1: synchronous training), got {t.sync_every}')
  for key in ('eval_every', 'stop_after', 'debug_nan_at_step', 'debug_hang_at_step'):
    _require(t[key] >= 0, f'train.{key}', f'must be >= 0, got {t[key]}')
  profile = tuple(t.profile_steps)
  _require(len(profile) == 2 and all(isinstance(n, int) for n in profile) and
           (profile == (0, 0) or min(profile) >= 1), 'train.profile_steps',
           f'must be (first step, count), both >= 1, or (0, 0) for off; got {t.profile_steps}')
  e = config.early_stop
  _one_of(config, 'early_stop.mode', ('min', 'max'))
  _require(e.patience > 0, 'early_stop.patience', f'must be positive, got {e.patience}')
  _require(e.min_delta >= 0, 'early_stop.min_delta', f'must be >= 0, got {e.min_delta}')
  _require(not e.metric or t.eval_every > 0, 'early_stop.metric',
           f'{e.metric!r} needs evaluations, but train.eval_every=0')
  f = config.finetune
  _require(f.backbone_lr_scale >= 0, 'finetune.backbone_lr_scale', 'must be >= 0')
  _require(config.init_from or not (f.freeze_backbone or f.backbone_lr_scale != 1),
           'finetune', 'freezing or scaling the backbone needs init_from (the backbone is what '
           'it loads)')


def check_lora(config, model: types.ModuleType):
  """The `finetune.lora_*` keys, against `model`'s dense layers."""
  f = config.finetune
  _require(f.lora_rank >= 0, 'finetune.lora_rank', f'must be >= 0 (0: off), got {f.lora_rank}')
  if not f.lora_rank:
    return
  available = getattr(model, 'lora_targets', None)
  _require(available is not None, 'finetune.lora_rank',
           f'model.name={config.model.name!r} has no layers LoRA adapts (transformer and '
           'encoder have)')
  _require(config.init_from, 'finetune.lora_rank', 'needs init_from (the frozen backbone is '
           'what it loads)')
  _require(f.backbone_lr_scale == 1, 'finetune.backbone_lr_scale',
           'LoRA freezes the backbone; leave it 1')
  _require(f.lora_alpha > 0, 'finetune.lora_alpha', f'must be > 0, got {f.lora_alpha}')
  targets = [t.strip() for t in f.lora_targets.split(',') if t.strip()]
  _require(targets, 'finetune.lora_targets', 'names no layer')
  for target in targets:
    _require(target in lora.TARGETS, 'finetune.lora_targets',
             f'unknown {target!r}; known are {", ".join(lora.TARGETS)}')
    _require(target in available(config.model), 'finetune.lora_targets',
             f'{target!r}: model.mlp={config.model.mlp!r} has no {target} layer (swiglu has)')


def check_health(config):
  h = config.health
  _require(h.every >= 0, 'health.every', f'must be >= 0 (0: off), got {h.every}')
  _require(0 <= h.vanishing_fraction < 1, 'health.vanishing_fraction',
           f'must be in [0, 1), got {h.vanishing_fraction}')
  for key in ('exploding_factor', 'growth_factor'):
    _require(h[key] > 1, f'health.{key}', f'must be > 1, got {h[key]}')
  _require(h.window > 0, 'health.window', f'must be positive, got {h.window}')


def check_mesh(config, resolved: Resolved, num_devices: int, num_processes: int,
               num_slices: int = 1):
  try:
    shape = sharding.mesh_shape(config.mesh, num_devices, num_slices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  sizes = dict(zip(sharding.MESH_AXES, shape))
  rules = config.mesh.rules
  shards = sharding.shards(sizes, sharding.logical_spec(rules, 'batch')[0])
  per_update = shards * config.train.grad_accum_steps
  _require(config.data.global_batch_size % per_update == 0, 'data.global_batch_size',
           f'{config.data.global_batch_size} is not divisible by {shards} data shards x '
           f'{config.train.grad_accum_steps} micro-batches')
  validate_sharding = getattr(resolved.model, 'validate_sharding', None)
  if validate_sharding:  # e.g. attention heads that the tensor axis must divide
    ways = lambda name: sharding.shards(sizes, sharding.logical_spec(rules, name)[0])
    _from_value_error(lambda: validate_sharding(config.model, ways))
  if sizes['stage'] > 1:
    check_stages(config, resolved, sizes['stage'], config.data.global_batch_size // per_update)
  _require(config.data.global_batch_size % num_processes == 0, 'data.global_batch_size',
           f'is not divisible by the {num_processes} processes')
  _from_value_error(lambda: resolved.task.validate_processes(num_processes))


def check_local_sgd(config):
  """With train.sync_every > 1: the outer optimiser, and what local SGD cannot do."""
  if config.train.sync_every == 1:
    return
  o = config.optim.outer
  _require(o.learning_rate > 0, 'optim.outer.learning_rate', f'must be > 0, got {o.learning_rate}')
  _require(0 <= o.momentum < 1, 'optim.outer.momentum', f'must be in [0, 1), got {o.momentum}')
  why = f'train.sync_every={config.train.sync_every}'
  _require(not config.init_from, 'init_from', f'cannot start local SGD ({why}) yet')
  _require(config.optim.schedule != 'reduce_on_plateau', 'optim.schedule',
           f'reduce_on_plateau lowers one rate, but with {why} each replica keeps its own')
  def axes(name_axes):  # None, 'fsdp' or ('data', 'fsdp') -> a tuple
    return (name_axes,) if isinstance(name_axes, str) else tuple(name_axes or ())
  batch_axes = axes(sharding.logical_spec(config.mesh.rules, 'batch')[0])
  _require(batch_axes[:1] == ('data',), 'mesh.rules',
           f"with {why} the data axis holds the replicas, so 'batch' must map to it first, "
           f'not to {batch_axes}')
  others = [name for name, mapped in config.mesh.rules if name != 'batch' and
            'data' in axes(mapped)]
  _require(not others, 'mesh.rules', f"with {why} the data axis holds the replicas: only 'batch' "
           f'may map to it, not {", ".join(others)}')


def check_stages(config, resolved: Resolved, stages: int, rows: int):
  """Pipeline stages need a model with a layer stack to split (its `validate_stages`) and a task
  that runs it; `rows`: the examples of each data shard in one micro-step."""
  validate_stages = getattr(resolved.model, 'validate_stages', None)
  stageable = [name for name, module in MODELS.items() if hasattr(module, 'validate_stages')]
  _require(validate_stages is not None, 'mesh.stage',
           f'{stages} pipeline stages (mesh.stage x mesh.dcn_stage) need a model with a layer '
           f'stack to split; model.name={config.model.name!r} has none '
           f'({", ".join(stageable)} has)')
  _from_value_error(lambda: validate_stages(config.model, stages, rows))
  _require(config.train.sync_every == 1, 'train.sync_every',
           f'local SGD ({config.train.sync_every}) does not run with {stages} pipeline stages yet')


def check_workdir(workdir: str):
  """A local workdir must be, or be creatable in, a writable directory; checked, not created."""
  if '://' in workdir:  # gs:// and other remote paths: the first write will tell
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  _require(os.path.isdir(path), '--workdir', f'{workdir!r} cannot be created: {path} is a file')
  _require(os.access(path, os.W_OK | os.X_OK), '--workdir', f'{path} is not writable')


def validate(config, num_devices: int, num_processes: int, num_slices: int = 1,
             platform: str = '', overridden=()) -> Resolved:
  """The config's Resolved choices, or ConfigError for the first problem found; `platform`
  ('cpu'|'gpu'|'tpu') if known; `overridden`: the config keys set on the command line."""
  model = check_model(config)
  if platform:  # kernels that exist on one platform only
    _from_value_error(lambda: platforms.check_platform(config.model, platform))
  resolved = Resolved(model, check_task(config, model))
  check_train(config, overridden)
  check_lora(config, model)
  check_health(config)
  _from_value_error(lambda: parts.validate(config))
  check_optim(config, overridden)
  check_mesh(config, resolved, num_devices, num_processes, num_slices)
  check_local_sgd(config)
  return resolved
