"""Rotary position embeddings (RoPE, Su et al. 2021) and their frequency scalings.

`model.position=rope` rotates each query and key pair (i, i + K/2) of the head dimension K by
position x frequency, frequency_i = rope_theta^(-2i/K) (halves rotated, as GPT-NeoX and Llama do).
`model.rope_scaling` rescales the frequencies for a longer context than the model was
pretrained with:
  none    as above (the default).
  llama3  Llama 3.1's (HF rope_type 'llama3', also Llama 3.2's): a frequency whose wavelength
          2 pi / frequency is longer than rope_original_max_len / rope_low_freq_factor is divided
          by rope_factor, one shorter than rope_original_max_len / rope_high_freq_factor is kept,
          and one between is interpolated linearly in rope_original_max_len / wavelength.
The keys are declared with the shared layers' (models/layers.py `default_config`).

Tensor names carry their shapes: B batch, L length, N heads, K head dim.
"""

import jax
import jax.numpy as jnp

from models import checks

SCALINGS = ('none', 'llama3')


def validate(m):
  """Raises ValueError('model.<key>: ...') for the first bad rope scaling key."""
  checks.one_of(m, 'rope_scaling', SCALINGS)
  if m.rope_scaling == 'none':
    return
  checks.require(m.position == 'rope', 'model.rope_scaling',
                 f'{m.rope_scaling!r} needs model.position=rope')
  checks.require(m.rope_factor >= 1, 'model.rope_factor', f'must be >= 1, got {m.rope_factor}')
  checks.require(0 < m.rope_low_freq_factor < m.rope_high_freq_factor, 'model.rope_low_freq_factor',
                 f'must be positive and below model.rope_high_freq_factor='
                 f'{m.rope_high_freq_factor}, got {m.rope_low_freq_factor}')
  checks.positive(m, 'rope_original_max_len')


def frequencies(cfg, head_dim: int) -> jax.Array:
  """The rotation per position of each pair of the head dimension [K/2] (float32)."""
  freq_K2 = cfg.rope_theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if cfg.rope_scaling == 'llama3':
    freq_K2 = _llama3(freq_K2, cfg)
  return freq_K2


def _llama3(freq_K2, cfg):
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  periods_K2 = cfg.rope_original_max_len * freq_K2 / (2 * jnp.pi)  # original_max_len / wavelength
  kept_K2 = jnp.clip((periods_K2 - low) / (high - low), 0.0, 1.0)  # 0: divided; 1: as it is
  return (1 - kept_K2) * freq_K2 / cfg.rope_factor + kept_K2 * freq_K2


def rotate(x_BxLxNxK, freq_K2, positions_BxL=None):
  """`x` with its last axis rotated at the frequencies `freq_K2` (`frequencies`), for tokens at
  `positions_BxL` (default: 0 .. L-1); computed in float32, returned in `x`'s dtype."""
  if positions_BxL is None:
    positions_BxL = jnp.arange(x_BxLxNxK.shape[1])[None, :]
  angle_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * freq_K2
  sin, cos = jnp.sin(angle_BxLxK2)[:, :, None, :], jnp.cos(angle_BxLxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxK.dtype)
