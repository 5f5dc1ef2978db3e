"""A ResNet for small images (He et al. 2016, section 4.2, the CIFAR-10 networks).

A 3x3 stem, then stages of basic blocks (two 3x3 convs, BatchNorm after each, an identity
shortcut, or a strided 1x1 conv + BatchNorm where the shape changes), global average pooling
and a linear head. Stage i has `width * 2**i` channels and, after the first, halves the
resolution; stage_sizes=(3, 3, 3), width=16 is ResNet-20.

BatchNorm normalises by the batch's statistics and updates its running averages when called
with `train=True`, and uses the running averages otherwise. The averages are `nnx.BatchStat`
variables, kept next to the parameters (not trained). Under a mesh the statistics are those of
the whole global batch, not of each device's shard: one device or many give the same model.

Tensor names carry their shapes: B batch, H height, W width, C channels, N classes. Parameters
carry logical axis names in their `logical_axes` metadata: conv kernels are ('conv_height',
'conv_width', 'embed', 'mlp'), BatchNorm scales, biases and statistics ('norm',), the head
('embed', 'classes').
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import checks, initializers, layers, platforms
from parallel.sharding import constrain

_NORM = {'logical_axes': ('norm',)}


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`): ResNet-20 for 32x32 colour images."""
  m = ml_collections.ConfigDict()
  m.name = 'resnet'
  m.image_shape = (32, 32, 3)  # height, width, channels
  m.num_classes = 10
  m.stage_sizes = (3, 3, 3)  # basic blocks per stage
  m.width = 16  # channels of the stem and the first stage; doubled by each later stage
  m.bn_momentum = 0.9  # running average = momentum * running + (1 - momentum) * batch
  m.bn_epsilon = 1e-5
  m.activation = 'relu'  # relu | leaky_relu | gelu | silu | tanh | sigmoid
  m.init = 'he_uniform'  # convs: an initializer of checks.INITS
  m.head_init = 'zeros'  # the linear head: zeros (first loss ln(num_classes)) | checks.INITS
  m.init_std = 0.02  # init or head_init 'normal' | 'truncated_normal': the standard deviation
  m.dropout_rate = 0.0  # on the pooled features, before the head
  # The last block's probability of skipping its residual branch for an example in training,
  # rising linearly from 0 at the first block (stochastic depth, Huang et al. 2016).
  m.stochastic_depth = 0.0
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  return m


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  del config  # nothing to check against the data's keys yet
  checks.image_classifier(m)
  checks.require(len(m.stage_sizes) > 0 and all(s > 0 for s in m.stage_sizes),
                 'model.stage_sizes',
                 f'must be one or more positive block counts, got {m.stage_sizes}')
  checks.positive(m, 'width', 'bn_epsilon')
  checks.require(0 <= m.bn_momentum < 1, 'model.bn_momentum',
                 f'must be in [0, 1), got {m.bn_momentum}')
  checks.one_of(m, 'activation', checks.ACTIVATIONS)
  checks.init(m, 'init')
  checks.head_init(m)
  checks.dtypes_and_dropout(m)
  checks.rate(m, 'stochastic_depth')


def _stages(m):
  """(blocks, channels, stride of the first block) of each stage."""
  return [(size, m.width * 2**i, 1 if i == 0 else 2) for i, size in enumerate(m.stage_sizes)]


def train_flops_per_example(m, config) -> float:
  """FLOPs to train on one image: 3x the forward pass's conv and matmul FLOPs (the backward
  pass computes the input's and the weight's gradient, each as costly as the forward), at 2
  FLOPs per multiply-add. BatchNorm, activations, pooling and the optimizer are left out."""
  del config
  height, width, channels = m.image_shape
  macs = height * width * 9 * channels * m.width  # the stem
  channels = m.width
  for blocks, features, stride in _stages(m):
    for block in range(blocks):
      if block == 0:
        height, width = -(-height // stride), -(-width // stride)  # 'SAME': ceil
        if stride != 1 or channels != features:
          macs += height * width * channels * features  # 1x1 projection
      macs += height * width * 9 * (channels + features) * features  # two 3x3 convs
      channels = features
  macs += channels * m.num_classes
  return 3 * 2 * macs


def _conv(c_in, c_out, kernel, stride, cfg, rngs):
  # No bias: the BatchNorm after each conv has one. By default He et al.'s variance for ReLU.
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding='SAME', use_bias=False,
                  kernel_init=initializers.conv_kernel(cfg.init, cfg.init_std),
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                  kernel_metadata={'logical_axes': ('conv_height', 'conv_width', 'embed', 'mlp')})


def _batch_norm(features, cfg, rngs):
  norm = nnx.BatchNorm(features, momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, scale_metadata=_NORM,
                       bias_metadata=_NORM, rngs=rngs)
  # The constructor takes metadata for scale and bias only: the statistics get theirs here.
  norm.mean.set_metadata(**_NORM)
  norm.var.set_metadata(**_NORM)
  return norm


class Block(nnx.Module):
  """act(bn(conv(act(bn(conv(x))))) + shortcut(x)), the shortcut projected by a strided 1x1
  conv + BatchNorm where the resolution or the channels change; `act` is `cfg.activation`."""

  def __init__(self, c_in, c_out, stride, cfg, *, rngs):
    self.activation = checks.ACTIVATIONS[cfg.activation]
    self.conv1 = _conv(c_in, c_out, 3, stride, cfg, rngs)
    self.norm1 = _batch_norm(c_out, cfg, rngs)
    self.conv2 = _conv(c_out, c_out, 3, 1, cfg, rngs)
    self.norm2 = _batch_norm(c_out, cfg, rngs)
    self.projects = stride != 1 or c_in != c_out
    if self.projects:
      self.proj = _conv(c_in, c_out, 1, stride, cfg, rngs)
      self.proj_norm = _batch_norm(c_out, cfg, rngs)

  def __call__(self, x_BxHxWxC, train: bool, depth_rate=0.0, depth_key=None):
    """`depth_key`: stochastic depth's key, the branch dropped at `depth_rate`; None: kept."""
    frozen = not train
    y_BxHxWxC = self.activation(self.norm1(self.conv1(x_BxHxWxC), use_running_average=frozen))
    y_BxHxWxC = self.norm2(self.conv2(y_BxHxWxC), use_running_average=frozen)
    if self.projects:
      x_BxHxWxC = self.proj_norm(self.proj(x_BxHxWxC), use_running_average=frozen)
    y_BxHxWxC = layers.drop_path(y_BxHxWxC, depth_rate, depth_key)
    return constrain(self.activation(y_BxHxWxC + x_BxHxWxC),
                     'batch', 'height', 'width', 'channels')


class Model(nnx.Module):
  """Images [B, H, W, C] (normalised float32) -> logits [B, N] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    self.stem = _conv(cfg.image_shape[-1], cfg.width, 3, 1, cfg, rngs)
    self.stem_norm = _batch_norm(cfg.width, cfg, rngs)
    blocks, channels = [], cfg.width
    for size, features, stride in _stages(cfg):
      for i in range(size):
        blocks.append(Block(channels, features, stride if i == 0 else 1, cfg, rngs=rngs))
        channels = features
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    # 16-bit activations: the logits are accumulated in float32.
    self.head = nnx.Linear(
        channels, cfg.num_classes, kernel_init=initializers.kernel(cfg.head_init, cfg.init_std),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        preferred_element_type=None if cfg.dtype == 'float32' else jnp.float32,
        kernel_metadata={'logical_axes': ('embed', 'classes')},
        bias_metadata={'logical_axes': ('classes',)}, rngs=rngs)

  def __call__(self, images_BxHxWxC, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """`train`: normalise by batch statistics and update the running averages. `rngs` carries
    the dropout and stochastic depth stream; without it both are off."""
    cfg, n = self.cfg, len(self.blocks)
    depth_keys = [None] * n
    if rngs is not None and cfg.stochastic_depth > 0:  # rate 0: today's stream
      depth_keys = list(jax.random.split(rngs.dropout(), n))
    rates = layers.depth_rates(cfg.stochastic_depth, n)
    activation = checks.ACTIVATIONS[cfg.activation]
    x_BxHxWxC = constrain(images_BxHxWxC, 'batch', 'height', 'width', 'channels')
    x_BxHxWxC = activation(self.stem_norm(self.stem(x_BxHxWxC), use_running_average=not train))
    for block, rate, key in zip(self.blocks, rates, depth_keys):
      x_BxHxWxC = block(x_BxHxWxC, train, float(rate), key)
    x_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
    x_BxC = self.dropout(x_BxC, deterministic=rngs is None, rngs=rngs)
    return constrain(self.head(x_BxC).astype(jnp.float32), 'batch', 'classes')
