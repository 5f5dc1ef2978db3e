"""Validates a config before anything compiles, with one-line errors that name the key."""

import os

from models import MODELS, platforms, transformer
from parallel import sharding
from training import optimizer


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
  m = config.model
  _one_of(config, 'model.name', sorted(MODELS))
  _one_of(config, 'model.position', ('learned', 'rope'))
  _one_of(config, 'model.norm', ('layernorm', 'rmsnorm'))
  _one_of(config, 'model.mlp', ('gelu', 'swiglu'))
  _one_of(config, 'model.dtype', ('auto', 'float32', 'bfloat16', 'float16'))
  _one_of(config, 'model.param_dtype', ('float32', 'bfloat16', 'float16'))
  for key in ('vocab_size', 'num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim',
              'max_len'):
    _require(m[key] > 0, f'model.{key}', f'must be positive, got {m[key]}')
  _require(m.embed_dim % m.num_heads == 0, 'model.embed_dim',
           f'{m.embed_dim} is not divisible by model.num_heads={m.num_heads}')
  _require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads',
           f'{m.num_kv_heads} does not divide model.num_heads={m.num_heads}')
  _require(m.position != 'rope' or (m.embed_dim // m.num_heads) % 2 == 0, 'model.num_heads',
           'rope needs an even head dimension (embed_dim / num_heads)')
  _require(0 <= m.dropout_rate < 1, 'model.dropout_rate', f'must be in [0, 1), got {m.dropout_rate}')
  # Memory levers.
  _one_of(config, 'model.remat', transformer.REMAT)
  unknown = sorted(set(m.remat_names) - set(transformer.REMAT_NAMES))
  _require(not unknown, 'model.remat_names',
           f'unknown {", ".join(unknown)}; tagged are {", ".join(transformer.REMAT_NAMES)}')
  _one_of(config, 'model.attention', ('auto', *platforms.ATTENTION))
  _require(m.loss_chunk >= 0, 'model.loss_chunk', f'must be >= 0, got {m.loss_chunk}')
  _require(not m.loss_chunk or config.data.seq_len % m.loss_chunk == 0, 'model.loss_chunk',
           f'{m.loss_chunk} does not divide data.seq_len={config.data.seq_len}')


def check_data(config):
  d = config.data
  _one_of(config, 'data.source', ('stdlib', 'files', 'tfds'))
  _require(d.source != 'files' or bool(d.files), 'data.files', "is empty but data.source='files'")
  _require(d.source != 'tfds' or bool(d.tfds_name), 'data.tfds_name',
           "is empty but data.source='tfds'")
  _require(config.model.vocab_size >= 256, 'model.vocab_size',
           f'{config.model.vocab_size} is too small for byte tokens (needs 256)')
  _require(d.seq_len > 0, 'data.seq_len', f'must be positive, got {d.seq_len}')
  _require(d.seq_len <= config.model.max_len, 'data.seq_len',
           f'{d.seq_len} is longer than model.max_len={config.model.max_len}')
  _require(0 <= d.eval_percent < 100, 'data.eval_percent', f'must be in [0, 100), got {d.eval_percent}')
  _require(d.global_batch_size > 0, 'data.global_batch_size', 'must be positive')
  _require(0 <= d.max_bad_fraction <= 1, 'data.max_bad_fraction', 'must be in [0, 1]')


def check_optim(config):
  o, steps = config.optim, config.train.steps
  _one_of(config, 'optim.schedule', optimizer.SCHEDULES)
  _require(o.learning_rate > 0, 'optim.learning_rate', f'must be > 0, got {o.learning_rate}')
  _require(0 <= o.warmup_steps < steps, 'optim.warmup_steps',
           f'{o.warmup_steps} must be in [0, train.steps={steps})')
  _require(o.weight_decay >= 0, 'optim.weight_decay', f'must be >= 0, got {o.weight_decay}')
  _require(o.grad_clip_norm > 0, 'optim.grad_clip_norm', f'must be > 0, got {o.grad_clip_norm}')
  _require(0 <= o.final_lr_fraction <= 1, 'optim.final_lr_fraction', 'must be in [0, 1]')


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
  for key in ('eval_every', 'eval_batches', 'stop_after', 'num_samples', 'debug_nan_at_step',
              'debug_hang_at_step'):
    _require(t[key] >= 0, f'train.{key}', f'must be >= 0, got {t[key]}')


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
  heads_ways = sharding.shards(sizes, sharding.logical_spec(rules, 'heads')[0])
  for key in ('num_heads', 'num_kv_heads'):
    _require(config.model[key] % heads_ways == 0, f'model.{key}',
             f'{config.model[key]} heads cannot be split {heads_ways} ways over the mesh')
  _require(config.data.global_batch_size % num_processes == 0, 'data.global_batch_size',
           f'is not divisible by the {num_processes} processes')
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
  needs = _KERNEL_PLATFORM.get(config.model.attention)
  _require(needs in (None, platform), 'model.attention',
           f'{config.model.attention} runs on {(needs or "").upper()} only, and this run is on '
           f'{platform.upper()}; use auto')


def validate(config, num_devices: int, num_processes: int, num_slices: int = 1,
             platform: str = ''):
  """Raises ConfigError for the first problem found; `platform` ('cpu'|'gpu'|'tpu') if known."""
  check_model(config)
  if platform:
    check_platform(config, platform)
  check_data(config)
  check_train(config)
  check_optim(config)
  check_mesh(config, num_devices, num_processes, num_slices)
