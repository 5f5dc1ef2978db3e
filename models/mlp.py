"""The multilayer perceptron: images flattened into dense layers, then a linear head.

Each entry of `hidden_dims` is a dense layer, the activation and dropout; `hidden_dims=()` is
softmax regression. The defaults (two layers of 512, ReLU, dropout 0.2) are the classic MNIST
MLP (configs/mnist_mlp.py). The head starts at zero by default, so every class starts equally
likely and the first loss is a uniform guess's, ln(num_classes).

Tensor names carry their shapes: B batch, H height, W width, C channels, D flattened features,
F hidden units, N classes. Every hidden kernel is ('embed', 'mlp') like the CNN's dense layer:
its input rows split over FSDP, its units over tensor parallelism; the head is ('mlp',
'classes').
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import checks, initializers, platforms
from parallel.sharding import constrain


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`), sized for 28x28 grey images."""
  m = ml_collections.ConfigDict()
  m.name = 'mlp'
  m.image_shape = (28, 28, 1)  # height, width, channels: flattened into the first layer
  m.num_classes = 10
  m.hidden_dims = (512, 512)  # one dense layer + activation + dropout per entry
  m.activation = 'relu'  # relu | leaky_relu | gelu | silu | tanh | sigmoid
  m.init = 'he_uniform'  # hidden layers: an initializer of checks.INITS
  m.head_init = 'zeros'  # the linear head: zeros (first loss ln(num_classes)) | checks.INITS
  m.init_std = 0.02  # init or head_init 'normal' | 'truncated_normal': the standard deviation
  m.dropout_rate = 0.2  # after every hidden layer
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  return m


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  del config  # nothing to check against the data's keys
  checks.image_classifier(m)
  checks.require(all(f > 0 for f in m.hidden_dims), 'model.hidden_dims',
                 f'must be positive widths (or none), got {m.hidden_dims}')
  checks.one_of(m, 'activation', checks.ACTIVATIONS)
  checks.init(m, 'init')
  checks.head_init(m)
  checks.dtypes_and_dropout(m)


def _widths(m) -> list[int]:
  """Inputs and outputs of each dense layer, head included: [D, F1, ..., N]."""
  height, width, channels = m.image_shape
  return [height * width * channels, *m.hidden_dims, m.num_classes]


def train_flops_per_example(m, config) -> float:
  """3x the forward matmuls' FLOPs (backward: the input's and the weight's gradient), 2 per
  multiply-add; activations, biases and dropout left out, as usual."""
  del config
  widths = _widths(m)
  return 3 * 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


class Model(nnx.Module):
  """Images [B, H, W, C] (normalised float32) -> logits [B, N] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    widths = _widths(cfg)
    init = initializers.kernel(cfg.init, cfg.init_std)
    self.hidden = nnx.List([nnx.Linear(
        d_in, d_out, kernel_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_metadata={'logical_axes': ('embed', 'mlp')},
        bias_metadata={'logical_axes': ('mlp',)}, rngs=rngs)
        for d_in, d_out in zip(widths[:-2], widths[1:-1])])
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    # 16-bit activations: the logits are accumulated in float32.
    self.head = nnx.Linear(
        widths[-2], cfg.num_classes, kernel_init=initializers.kernel(cfg.head_init, cfg.init_std),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        preferred_element_type=None if cfg.dtype == 'float32' else jnp.float32,
        kernel_metadata={'logical_axes': ('mlp', 'classes')},
        bias_metadata={'logical_axes': ('classes',)}, rngs=rngs)

  def __call__(self, images_BxHxWxC, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation). `train` is
    accepted for the classifiers' common signature: this model has no batch statistics."""
    del train
    activation = checks.ACTIVATIONS[self.cfg.activation]
    images_BxHxWxC = constrain(images_BxHxWxC, 'batch', 'height', 'width', 'channels')
    h_BxF = images_BxHxWxC.reshape(images_BxHxWxC.shape[0], -1)
    for layer in self.hidden:
      h_BxF = constrain(activation(layer(h_BxF)), 'batch', 'mlp')
      h_BxF = self.dropout(h_BxF, deterministic=rngs is None, rngs=rngs)
    return constrain(self.head(h_BxF).astype(jnp.float32), 'batch', 'classes')
