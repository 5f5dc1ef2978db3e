"""The classic small convolutional classifier (MNIST / Fashion-MNIST / CIFAR scale).

Each entry of `conv_features` is a 'SAME' convolution, the activation and a 2x2 max pool; then
the feature map is flattened into a hidden dense layer, dropout and a linear head. The defaults
(32 and 64 3x3 filters, 256 hidden units, dropout 0.3) are the two-conv Fashion-MNIST network:
Adam (1e-3, cosine decay, batch 128) took it to 0.872 / 0.895 / 0.901 test accuracy after 1 / 2 /
3 epochs here; 0.92 takes longer training (configs/fashion_mnist_cnn.py runs 10 epochs).

Tensor names carry their shapes: B batch, H height, W width, C channels, D flattened features,
F hidden units, N classes. Parameters carry logical axis names in their `logical_axes` metadata:
a conv kernel is ('conv_height', 'conv_width', 'embed', 'mlp'), its input channels split like a
dense layer's input (FSDP) and its output channels like its output (tensor); the spatial axes
and 'classes' have no rule and stay whole.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import checks, initializers, platforms
from parallel.sharding import constrain


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`), sized for 28x28 grey images."""
  m = ml_collections.ConfigDict()
  m.name = 'cnn'
  m.image_shape = (28, 28, 1)  # height, width, channels
  m.num_classes = 10
  m.conv_features = (32, 64)  # one conv + activation + 2x2 max pool per entry
  m.kernel_size = 3
  m.dense_dim = 256
  m.activation = 'relu'  # relu | leaky_relu | gelu | silu | tanh | sigmoid
  m.init = 'he_uniform'  # convs and hidden layer: an initializer of checks.INITS
  m.head_init = 'zeros'  # the linear head: zeros (first loss ln(num_classes)) | checks.INITS
  m.init_std = 0.02  # init or head_init 'normal' | 'truncated_normal': the standard deviation
  m.dropout_rate = 0.3  # on the hidden dense layer
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  return m


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  del config  # nothing to check against the data's keys yet
  checks.image_classifier(m)
  checks.require(len(m.conv_features) > 0 and all(f > 0 for f in m.conv_features),
                 'model.conv_features',
                 f'must be one or more positive widths, got {m.conv_features}')
  checks.positive(m, 'kernel_size', 'dense_dim')
  pools = 2 ** len(m.conv_features)
  checks.require(min(m.image_shape[:2]) >= pools, 'model.image_shape',
                 f'{m.image_shape[:2]} is smaller than the {pools}x{pools} that '
                 f'{len(m.conv_features)} 2x2 pools reduce to one pixel')
  checks.one_of(m, 'activation', checks.ACTIVATIONS)
  checks.init(m, 'init')
  checks.head_init(m)
  checks.dtypes_and_dropout(m)


def train_flops_per_example(m, config) -> float:
  """FLOPs to train on one image: 3x the forward pass's conv and matmul FLOPs (the backward
  pass computes the input's and the weight's gradient, each as costly as the forward), at 2
  FLOPs per multiply-add. Pooling, activations, biases and dropout are left out, as usual."""
  del config
  height, width, channels = m.image_shape
  macs = 0
  for features in m.conv_features:
    macs += height * width * m.kernel_size**2 * channels * features  # 'SAME': full size out
    height, width, channels = height // 2, width // 2, features
  macs += height * width * channels * m.dense_dim + m.dense_dim * m.num_classes
  return 3 * 2 * macs


def max_pool_2x2(x_BxHxWxC):
  """2x2 max pooling with stride 2 (an odd last row or column is dropped, as 'VALID' does).

  As a reshape and a max rather than `nnx.max_pool`: same values, and XLA:CPU's gradient of a
  reduce_window (select-and-scatter) is slow, about a third of the Fashion-MNIST CNN's step."""
  b, h, w, c = x_BxHxWxC.shape
  x_BxHxWxC = x_BxHxWxC[:, :h - h % 2, :w - w % 2]
  return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Model(nnx.Module):
  """Images [B, H, W, C] (normalised float32) -> logits [B, N] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    height, width, channels = cfg.image_shape
    # By default He et al.'s variance for ReLU-like activations, drawn uniformly.
    init = initializers.kernel(cfg.init, cfg.init_std)
    conv_init = initializers.conv_kernel(cfg.init, cfg.init_std)
    convs = []
    for features in cfg.conv_features:
      convs.append(nnx.Conv(
          channels, features, (cfg.kernel_size, cfg.kernel_size), padding='SAME',
          kernel_init=conv_init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
          kernel_metadata={'logical_axes': ('conv_height', 'conv_width', 'embed', 'mlp')},
          bias_metadata={'logical_axes': ('mlp',)}))
      height, width, channels = height // 2, width // 2, features
    self.convs = nnx.List(convs)
    self.hidden = nnx.Linear(
        height * width * channels, cfg.dense_dim, kernel_init=init, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, kernel_metadata={'logical_axes': ('embed', 'mlp')},
        bias_metadata={'logical_axes': ('mlp',)}, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    # 16-bit activations: the logits are accumulated in float32.
    self.head = nnx.Linear(
        cfg.dense_dim, cfg.num_classes,
        kernel_init=initializers.kernel(cfg.head_init, cfg.init_std), dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        preferred_element_type=None if cfg.dtype == 'float32' else jnp.float32,
        kernel_metadata={'logical_axes': ('mlp', 'classes')},
        bias_metadata={'logical_axes': ('classes',)}, rngs=rngs)

  def __call__(self, images_BxHxWxC, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation). `train` is
    accepted for the classifiers' common signature: this model has no batch statistics."""
    del train
    activation = checks.ACTIVATIONS[self.cfg.activation]
    x_BxHxWxC = constrain(images_BxHxWxC, 'batch', 'height', 'width', 'channels')
    for conv in self.convs:
      x_BxHxWxC = max_pool_2x2(activation(conv(x_BxHxWxC)))
      x_BxHxWxC = constrain(x_BxHxWxC, 'batch', 'height', 'width', 'channels')
    x_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    h_BxF = constrain(activation(self.hidden(x_BxD)), 'batch', 'mlp')
    h_BxF = self.dropout(h_BxF, deterministic=rngs is None, rngs=rngs)
    return constrain(self.head(h_BxF).astype(jnp.float32), 'batch', 'classes')
