"""Per-platform defaults for model settings left as 'auto'.

The platform is an argument, not `jax.default_backend()`: ahead-of-time compilation for a TPU
topology runs on a CPU host, and must build the model as the TPU will run it.
"""

import jax
import ml_collections

PLATFORMS = ('cpu', 'gpu', 'tpu')
# Attention kernels: 'cpu' is XLA:CPU's tuned equivalent of 'xla' (models/cpu_kernels.py).
ATTENTION = ('cpu', 'xla', 'cudnn', 'splash')
_KERNEL_PLATFORM = {'splash': 'tpu', 'cudnn': 'gpu'}  # kernels that exist on one platform only


def check_platform(model_config, platform: str):
  """Raises ValueError('model.attention: ...') for a kernel that `platform` lacks."""
  attention = model_config.get('attention')
  needs = _KERNEL_PLATFORM.get(attention)
  if needs not in (None, platform):
    raise ValueError(f'model.attention: {attention} runs on {needs.upper()} only, and this run '
                     f'is on {platform.upper()}; use auto')


def resolve_for_platform(model_config, platform: str) -> ml_collections.ConfigDict:
  """A copy of `model_config` with 'auto' settings chosen for `platform` ('cpu'|'gpu'|'tpu').

  dtype 'auto': bfloat16 activations on accelerators (parameters and optimizer state keep
  `param_dtype`), float32 on CPU, where bfloat16 matmuls are emulated and slow.
  attention 'auto': the Pallas splash kernel on TPU, cuDNN's fused kernel on GPU for 16-bit
  activations (it takes no float32), XLA's otherwise, and the CPU-tuned path on CPU.
  The copy also records `platform`, which picks the CPU-only matmul paths in the model.
  """
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r} is not one of {", ".join(PLATFORMS)}')
  resolved = ml_collections.ConfigDict(model_config.to_dict())
  if resolved.get('dtype') == 'auto':
    resolved.dtype = 'float32' if platform == 'cpu' else 'bfloat16'
  if resolved.get('attention') == 'auto':
    resolved.attention = {'cpu': 'cpu', 'tpu': 'splash'}.get(platform) or (
        'cudnn' if resolved.dtype in ('bfloat16', 'float16') else 'xla')
  resolved.platform = platform
  return resolved


def model_settings(model_config) -> ml_collections.FrozenConfigDict:
  """What a model's `__init__` keeps: `model_config` resolved (for JAX's default backend if
  it was not already, e.g. by the trainer for its mesh) and frozen, hence hashable, so that
  graph definitions can be compared."""
  if 'platform' not in model_config:
    model_config = resolve_for_platform(model_config, jax.default_backend())
  return ml_collections.FrozenConfigDict(model_config)


def mesh_platform(mesh) -> str:
  """The platform of a mesh's devices: 'tpu' for a mesh over an AOT topology on a CPU host."""
  return mesh.devices.flat[0].platform
