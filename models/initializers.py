"""Kernel initializers by name (`model.init`, the names in models/checks.py INITS), built from
`nnx.initializers`.

`kernel(name, std, scale)` is the dense layers' initializer; `scale` multiplies the standard
deviation of what it draws (the Transformer blocks' depth-scaled output projections). 'zeros'
is for classifier heads only (`model.head_init`, checks.HEAD_INITS): a zero head predicts every
class equally, so training starts at the loss of a uniform guess, ln(num_classes).
`conv_kernel(name, std)` is the same distribution for a conv kernel [height, width, in, out].
"""

import math

import jax.numpy as jnp
from flax import nnx

# Variance-scaling families: (variance numerator, fan it divides by).
_SCALED = {'xavier': (1.0, 'fan_avg'), 'he': (2.0, 'fan_in'), 'lecun': (1.0, 'fan_in')}


def kernel(name: str, std: float, scale: float = 1.0) -> nnx.Initializer:
  """normal / truncated_normal: N(0, std) (truncated at two standard deviations: `std` is the
  untruncated one, as in BERT and ViT); the others ignore `std`. Each draws `scale` times it."""
  if name == 'zeros':
    return nnx.initializers.zeros_init()
  if name == 'normal':
    return nnx.initializers.normal(std * scale)
  if name == 'truncated_normal':
    return nnx.initializers.truncated_normal(std * scale)
  if name == 'orthogonal':
    return nnx.initializers.orthogonal(scale)
  family, distribution = name.split('_')
  numerator, mode = _SCALED[family]
  return nnx.initializers.variance_scaling(numerator * scale**2, mode, distribution)


def conv_kernel(name: str, std: float) -> nnx.Initializer:
  """`kernel(name, std)` for a conv kernel [height, width, in, out], drawn as a [window x in,
  out] matrix and reshaped. The reason is speed: XLA:CPU takes seconds to compile JAX's
  (partitionable) threefry sampler for a 4-D shape, a fraction of that for a 2-D one.

  The distribution is the kernel's own: the fan-in (He, LeCun) is window x in either way; the
  fan average (Xavier) of the kernel, window x (in + out) / 2, is not the matrix's, so Xavier's
  variance is restated against the fan-in. 'orthogonal' is JAX's definition for any rank: the
  kernel flattened to [window x in, out] has orthonormal columns (rows, where out > window x in),
  so the map from an input patch to the output channels is an isometry (Saxe et al. 2014); it
  is not the delta-orthogonal init of Xiao et al. 2018.
  """
  def draw(key, shape, dtype=jnp.float32):
    init = kernel(name, std)
    family, _, distribution = name.partition('_')
    if family == 'xavier':
      c_in, c_out = shape[-2:]
      # 2 / (window (in + out)) = (2 in / (in + out)) / (window in)
      init = nnx.initializers.variance_scaling(2 * c_in / (c_in + c_out), 'fan_in', distribution)
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
  return draw
