"""Vision Transformer (Dosovitskiy et al. 2021): images as sequences of patches.

Each `patch_size` x `patch_size` patch is flattened and projected to `embed_dim`; a learned
[CLS] token is prepended (pool='cls') and learned positions added (position='learned'; 'rope'
rotates queries and keys by the patch's index in row-major order instead). The tokens go
through the shared bidirectional encoder blocks (models/layers.py, which bring `scan_layers`,
`remat`, the attention kernels and the CPU paths), a final norm, and a linear head on the [CLS]
token or on the mean of the patch tokens (pool='mean', no [CLS] token).

Tensor names carry their shapes: B batch, H height, W width, C channels, P patches, L tokens
(patches, plus [CLS] for pool='cls'), D embed, N classes. Parameters carry logical axis names in
their `logical_axes` metadata: the patch projection is ('patch', 'embed'), the head ('embed',
'classes'); 'patch' and 'classes' have no rule and stay whole.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import blocks, checks, flops, layers, platforms
from parallel.sharding import constrain

POOLS = ('cls', 'mean')


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`): a small ViT for 28x28 grey images."""
  m = layers.default_config()
  m.name = 'vit'
  m.image_shape = (28, 28, 1)  # height, width, channels
  m.patch_size = 7  # 4 x 4 = 16 patches
  m.num_classes = 10
  m.head_init = 'zeros'  # the linear head: zeros (first loss ln(num_classes)) | checks.INITS
  m.pool = 'cls'  # cls: the [CLS] token's output | mean: the mean of the patch outputs
  m.num_layers = 6
  m.max_len = 17  # tokens: the patches, plus one for the [CLS] token with pool='cls'
  return m


def num_patches(m) -> int:
  height, width, _ = m.image_shape
  return (height // m.patch_size) * (width // m.patch_size)


def num_tokens(m) -> int:
  """The encoder's sequence length: the patches, and the [CLS] token with pool='cls'."""
  return num_patches(m) + (m.pool == 'cls')


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  del config  # nothing to check against the data's keys yet
  checks.image_classifier(m)
  checks.positive(m, 'patch_size')
  checks.require(all(d % m.patch_size == 0 for d in m.image_shape[:2]), 'model.patch_size',
                 f'{m.patch_size} does not divide the image size {m.image_shape[:2]}')
  checks.one_of(m, 'pool', POOLS)
  checks.head_init(m)
  layers.validate(m)
  checks.require(m.max_len == num_tokens(m), 'model.max_len',
           f'must be the number of tokens, {num_tokens(m)} ({num_patches(m)} patches'
           f'{" and [CLS]" if m.pool == "cls" else ""}), got {m.max_len}')


validate_sharding = checks.heads_split


def train_flops_per_example(m, config) -> float:
  """FLOPs to train on one image: 3x the forward pass's matmul FLOPs (2 per multiply-add), as
  models/flops.py counts them per token. Attention is bidirectional, so the whole L x L score
  matrix counts; the patch projection runs on every patch and the head once per image."""
  del config
  tokens, patch_dim = num_tokens(m), m.patch_size**2 * m.image_shape[-1]
  per_token = (6 * flops.block_matmul_params(m) +
               flops.attention_flops_per_token(m, tokens, causal=False))
  return (tokens * per_token + 6 * num_patches(m) * patch_dim * m.embed_dim +
          6 * m.embed_dim * m.num_classes)


class Model(nnx.Module):
  """Images [B, H, W, C] (normalised float32) -> logits [B, N] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    patch_dim = cfg.patch_size**2 * cfg.image_shape[-1]
    self.patch_embed = layers.Dense(patch_dim, cfg.embed_dim, 'patch', 'embed', cfg, rngs=rngs)
    if cfg.pool == 'cls':
      self.cls_token = nnx.Param(jnp.zeros((cfg.embed_dim,), cfg.param_dtype),
                                 logical_axes=('embed',))
    if cfg.position == 'learned':
      self.positions = layers.learned_positions(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    self.blocks = blocks.Blocks(cfg, rngs=rngs, causal=False)
    self.final_norm = layers.norm(cfg, rngs)
    # 16-bit activations: the logits are accumulated in float32.
    wide = None if cfg.dtype == 'float32' else jnp.float32
    self.head = layers.Dense(cfg.embed_dim, cfg.num_classes, 'embed', 'classes', cfg, rngs=rngs,
                             init=cfg.head_init, preferred_element_type=wide)

  def __call__(self, images_BxHxWxC, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation). `train` is
    accepted for the classifiers' common signature: this model has no batch statistics."""
    del train
    x_BxLxD = self.tokens(images_BxHxWxC)
    x_BxLxD = self.dropout(x_BxLxD, deterministic=rngs is None, rngs=rngs)
    x_BxLxD = constrain(x_BxLxD, 'batch', 'length', 'embed')
    x_BxLxD = self.final_norm(self.blocks(x_BxLxD, None if rngs is None else rngs.dropout()))
    x_BxD = x_BxLxD[:, 0] if self.cfg.pool == 'cls' else jnp.mean(x_BxLxD, axis=1)
    return constrain(self.head(x_BxD).astype(jnp.float32), 'batch', 'classes')

  def tokens(self, images_BxHxWxC):
    """The encoder's input [B, L, D]: projected patches, [CLS] first, positions added."""
    cfg = self.cfg
    b, h, w, c = images_BxHxWxC.shape
    s = cfg.patch_size
    # Row-major patches, each flattened (row, column, channel).
    patches_BxPxS2C = (images_BxHxWxC.reshape(b, h // s, s, w // s, s, c)
                       .transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // s) * (w // s), s * s * c))
    x_BxPxD = self.patch_embed(patches_BxPxS2C)
    x_BxLxD = x_BxPxD
    if cfg.pool == 'cls':
      cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(x_BxPxD.dtype),
                                   (b, 1, cfg.embed_dim))
      x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxPxD], axis=1)
    if cfg.position == 'learned':
      x_BxLxD = x_BxLxD + self.positions[...].astype(x_BxLxD.dtype)
    return x_BxLxD
