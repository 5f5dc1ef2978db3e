"""A convolutional autoencoder: images -> a small feature map (the bottleneck) -> images.

The encoder is one 'SAME' convolution with stride 2 and the activation per entry of `features`
(each halves the height and width), then a linear convolution down to `latent_features`
channels: the bottleneck. The decoder mirrors it with 2x2 transposed convolutions of stride 2
and the activation (each doubles the height and width; U-Net's up-convolution) and ends in a
linear convolution back to the image's channels, so the output has the input's shape. The
defaults on 28x28 grey images: 28 -> 14 -> 7 with 32 and 64 filters, a 7x7x8 bottleneck (392
values, half the pixels), 7 -> 14 -> 28 back.

Tensor names carry their shapes: B batch, H height, W width, C channels. Conv kernels are
('conv_height', 'conv_width', 'embed', 'mlp') as in models/cnn.py: input channels split like a
dense layer's input (FSDP), output channels like its output (tensor); the last convolution's
output channels are the image's ('channels', no rule: whole).
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import checks, initializers, platforms
from parallel.sharding import constrain

_KERNEL = {'logical_axes': ('conv_height', 'conv_width', 'embed', 'mlp')}
_BIAS = {'logical_axes': ('mlp',)}


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`), sized for 28x28 grey images."""
  m = ml_collections.ConfigDict()
  m.name = 'autoencoder'
  m.image_shape = (28, 28, 1)  # height, width, channels: the input's and the output's
  m.features = (32, 64)  # one stride-2 conv + activation per entry, mirrored by the decoder
  m.latent_features = 8  # channels of the bottleneck, at 1 / 2**len(features) of the size
  m.kernel_size = 3
  m.activation = 'relu'  # relu | leaky_relu | gelu | silu | tanh | sigmoid
  # Every convolution: an initializer of checks.INITS. LeCun's, not He's: the output is linear
  # and starts smaller (Fashion-MNIST, 150 steps: 16.5 dB against 15.6).
  m.init = 'lecun_normal'
  m.init_std = 0.02  # init 'normal' | 'truncated_normal': the standard deviation
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  return m


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  del config  # nothing to check against the data's keys
  checks.require(len(m.image_shape) == 3 and all(d > 0 for d in m.image_shape),
                 'model.image_shape',
                 f'must be three positive sizes (height, width, channels), got {m.image_shape}')
  checks.require(len(m.features) > 0 and all(f > 0 for f in m.features), 'model.features',
                 f'must be one or more positive widths, got {m.features}')
  checks.positive(m, 'latent_features', 'kernel_size')
  scale = 2 ** len(m.features)
  checks.require(all(d % scale == 0 for d in m.image_shape[:2]), 'model.image_shape',
                 f'{tuple(m.image_shape[:2])} is not divisible by {scale}, which '
                 f'{len(m.features)} stride-2 convolutions need to come back to the same size')
  checks.one_of(m, 'activation', checks.ACTIVATIONS)
  checks.init(m, 'init')
  checks.one_of(m, 'dtype', checks.DTYPES)
  checks.one_of(m, 'param_dtype', checks.PARAM_DTYPES)


def _layers(m) -> list[tuple[int, int, int, int]]:
  """(kernel pixels, input channels, output channels, pixels it is applied at) of every
  convolution, in order; an up-convolution is a 1x1 one to 4x the channels (`up_2x2`)."""
  height, width, channels = m.image_shape
  pixels, window = height * width, m.kernel_size**2
  bottom = pixels // 4 ** len(m.features)
  widths = [channels, *m.features]
  down = [(window, a, b, pixels // 4 ** (i + 1))
          for i, (a, b) in enumerate(zip(widths, widths[1:]))]
  up_widths = [m.latent_features, *m.features[::-1]]
  up = [(1, a, 4 * b, bottom * 4 ** i) for i, (a, b) in enumerate(zip(up_widths, up_widths[1:]))]
  return [*down, (window, m.features[-1], m.latent_features, bottom), *up,
          (window, m.features[0], channels, pixels)]


def train_flops_per_example(m, config) -> float:
  """3x the forward pass's conv FLOPs (the backward pass computes the input's and the weight's
  gradient, each as costly), 2 per multiply-add. Activations and biases are left out, as
  usual."""
  del config
  return 3 * 2 * sum(k * a * b * pixels for k, a, b, pixels in _layers(m))


def up_2x2(x_BxHxWxC4):
  """[B, H, W, 4C] -> [B, 2H, 2W, C]: pixel (h, w)'s channels become its 2x2 block's, so a 1x1
  convolution to 4C channels before it is a 2x2 transposed convolution of stride 2.

  Written so rather than as `nnx.ConvTranspose`: the same map, and XLA:CPU's gradient of a
  transposed convolution is slow (the default's 64 -> 32 layer, batch 128: 1.1 s, this 0.2 s;
  with 3x3 kernels 1.8 s of a 2.1 s step)."""
  b, h, w, c4 = x_BxHxWxC4.shape
  x = x_BxHxWxC4.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


class Model(nnx.Module):
  """Images [B, H, W, C] (float32) -> images [B, H, W, C] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    window = (cfg.kernel_size, cfg.kernel_size)
    init = initializers.conv_kernel(cfg.init, cfg.init_std)
    common = dict(kernel_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    layers = _layers(cfg)
    n = len(cfg.features)
    self.down = nnx.List([nnx.Conv(a, b, window, 2, kernel_metadata=_KERNEL,
                                   bias_metadata=_BIAS, **common) for _, a, b, _ in layers[:n]])
    _, a, b, _ = layers[n]
    self.bottleneck = nnx.Conv(a, b, window, kernel_metadata=_KERNEL, bias_metadata=_BIAS,
                               **common)
    self.up = nnx.List([nnx.Conv(a, b, (1, 1), kernel_metadata=_KERNEL, bias_metadata=_BIAS,
                                 **common) for _, a, b, _ in layers[n + 1:-1]])
    _, a, b, _ = layers[-1]
    # 16-bit activations: the output image is accumulated in float32.
    self.out = nnx.Conv(
        a, b, window, preferred_element_type=None if cfg.dtype == 'float32' else jnp.float32,
        kernel_metadata={'logical_axes': ('conv_height', 'conv_width', 'embed', 'channels')},
        bias_metadata={'logical_axes': ('channels',)}, **common)

  def __call__(self, images_BxHxWxC, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """`train` and `rngs` are accepted for the image models' common signature: this model has
    no dropout and no batch statistics."""
    del train, rngs
    activation = checks.ACTIVATIONS[self.cfg.activation]
    x_BxHxWxC = constrain(images_BxHxWxC, 'batch', 'height', 'width', 'channels')
    for conv in self.down:
      x_BxHxWxC = constrain(activation(conv(x_BxHxWxC)), 'batch', 'height', 'width', 'channels')
    x_BxHxWxC = constrain(self.bottleneck(x_BxHxWxC), 'batch', 'height', 'width', 'channels')
    for conv in self.up:
      x_BxHxWxC = constrain(activation(up_2x2(conv(x_BxHxWxC))), 'batch', 'height', 'width',
                            'channels')
    return constrain(self.out(x_BxHxWxC).astype(jnp.float32), 'batch', 'height', 'width',
                     'channels')
