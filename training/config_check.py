"""Validates a config before anything compiles, with one-line errors that name the key."""

import os

from configs import common
from models import MODELS
from parallel import sharding
from tasks import TASKS
from training import optimizer, parts, precision


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the key's name."""


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f'{key}: {message}')


def _one_of(config, key: str, choices):
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(value in choices, key, f'{value!r} is not one of {", ".join(map(str, choices))}')


def check_model(config):
  _one_of(config, 'model.name', sorted(MODELS))
  _from_value_error(lambda: MODELS[config.model.name].validate(config.model, config))


def check_task(config):
  _one_of(config, 'task.name', sorted(TASKS))
  d = config.data
  _require(d.global_batch_size > 0, 'data.global_batch_size', 'must be positive')
  _require(0 <= d.max_bad_fraction <= 1, 'data.max_bad_fraction', 'must be in [0, 1]')
  _require(0 < d.warn_wait_share <= 1, 'data.warn_wait_share', 'must be in (0, 1]')
  _require(d.worker_threads >= 0, 'data.worker_threads', 'must be >= 0 (0: half the CPUs)')
  task = TASKS[config.task.name].Task(config, MODELS[config.model.name])
  _from_value_error(task.validate)


def _from_value_error(check):
  """Runs a model's or task's own check, whose ValueError names the key."""
  try:
    check()
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_optim(config, overridden=()):
  """`overridden`: the keys set on the command line, e.g. {'optim.sgd.momentum'}."""
  _from_value_error(lambda: optimizer.validate(
      config.optim, config.train.steps, config.train.eval_every, common.optim_config(),
      overridden))


def check_train(config):
  t = config.train
  for key in ('steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'grad_accum_steps'):
    _require(t[key] > 0, f'train.{key}', f'must be positive, got {t[key]}')
  _one_of(config, 'train.nonfinite_policy', ('skip', 'rollback', 'stop'))
  _one_of(config, 'train.on_save_error', ('warn', 'stop'))
  _require(t.spike_sigmas >= 0, 'train.spike_sigmas', f'must be >= 0, got {t.spike_sigmas}')
  _require(t.spike_window > 1, 'train.spike_window', f'must be > 1, got {t.spike_window}')
  _require(t.hang_factor == 0 or t.hang_factor > 1, 'train.hang_factor', 'must be 0 (off) or > 1')
  _require(t.hang_min_seconds > 0, 'train.hang_min_seconds', 'must be positive')
  _one_of(config, 'train.loss_scale', precision.MODES)
  _require(t.loss_scale_init >= 1, 'train.loss_scale_init',
           f'must be >= 1, got {t.loss_scale_init}')
  _require(t.loss_scale_period > 0, 'train.loss_scale_period',
           f'must be positive, got {t.loss_scale_period}')
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


def check_health(config):
  h = config.health
  _require(h.every >= 0, 'health.every', f'must be >= 0 (0: off), got {h.every}')
  _require(0 <= h.vanishing_fraction < 1, 'health.vanishing_fraction',
           f'must be in [0, 1), got {h.vanishing_fraction}')
  for key in ('exploding_factor', 'growth_factor'):
    _require(h[key] > 1, f'health.{key}', f'must be > 1, got {h[key]}')
  _require(h.window > 0, 'health.window', f'must be positive, got {h.window}')


def check_mesh(config, num_devices: int, num_processes: int, num_slices: int = 1):
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
  validate_sharding = getattr(MODELS[config.model.name], 'validate_sharding', None)
  if validate_sharding:  # e.g. attention heads that the tensor axis must divide
    ways = lambda name: sharding.shards(sizes, sharding.logical_spec(rules, name)[0])
    _from_value_error(lambda: validate_sharding(config.model, ways))
  _require(config.data.global_batch_size % num_processes == 0, 'data.global_batch_size',
           f'is not divisible by the {num_processes} processes')
  if 'num_streams' in config.data:  # data read in streams, each owned by one process
    streams = config.data.num_streams or num_processes
    _require(streams >= 0 and streams % num_processes == 0, 'data.num_streams',
             f'{config.data.num_streams} streams cannot be shared by {num_processes} processes')
    _require(config.data.global_batch_size % streams == 0, 'data.global_batch_size',
             f'{config.data.global_batch_size} is not divisible by {streams} data streams')


def check_workdir(workdir: str):
  """A local workdir must be, or be creatable in, a writable directory; checked, not created."""
  if '://' in workdir:  # gs:// and other remote paths: the first write will tell
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  _require(os.path.isdir(path), '--workdir', f'{workdir!r} cannot be created: {path} is a file')
  _require(os.access(path, os.W_OK | os.X_OK), '--workdir', f'{path} is not writable')


_KERNEL_PLATFORM = {'splash': 'tpu', 'cudnn': 'gpu'}


def check_platform(config, platform: str):
  """Attention kernels that exist on one platform only."""
  needs = _KERNEL_PLATFORM.get(config.model.get('attention'))
  if needs is None:
    return
  _require(needs in (None, platform), 'model.attention',
           f'{config.model.attention} runs on {(needs or "").upper()} only, and this run is on '
           f'{platform.upper()}; use auto')


def validate(config, num_devices: int, num_processes: int, num_slices: int = 1,
             platform: str = '', overridden=()):
  """Raises ConfigError for the first problem found; `platform` ('cpu'|'gpu'|'tpu') if known;
  `overridden`: the config keys set on the command line."""
  check_model(config)
  if platform:
    check_platform(config, platform)
  check_task(config)
  check_train(config)
  check_health(config)
  _from_value_error(lambda: parts.validate(config))
  check_optim(config, overridden)
  check_mesh(config, num_devices, num_processes, num_slices)
