"""The residual block stack: `cfg.num_layers` blocks (models/layers.py `Block`) in order, as a
list or one stacked block scanned (`cfg.scan_layers`), rematerialised as `cfg.remat` says, and
split into pipeline stages over the mesh's `stage` axis (parallel/pipeline.py)."""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Block, depth_rates
from parallel import pipeline

# The stacked blocks' leading axis, named for sharding ('layers' maps to the `stage` mesh axis).
_LAYERS = {nnx.PARTITION_NAME: 'layers', 'logical_axes': 'layers'}


def _stacked_blocks(cfg, rngs, causal) -> Block:
  """`num_layers` blocks as one Block whose parameters have a leading 'layers' axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS)
  def make(rngs):
    return Block(cfg, rngs=rngs, causal=causal)

  return make(rngs)


def _layer(tree, i):
  """Layer `i` of a tree of stacked arrays (None stays None)."""
  return None if tree is None else jax.tree.map(lambda x: x[i], tree)


def remat_policy(cfg):
  """What `jax.checkpoint` keeps of a block's activations (the rest is recomputed)."""
  if cfg.remat == 'dots':
    # Projection outputs ([B, L, *], linear in L), not the attention scores [B, H, L, L] (a
    # batched matmul): quadratic in L, they would outgrow the memory remat is meant to save.
    # (On CPU the projections are custom-gradient matmuls the policy cannot see: as 'full'.)
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if cfg.remat == 'names':
    return jax.checkpoint_policies.save_only_these_names(*cfg.remat_names)
  return None  # full: only the block's input


class Blocks(nnx.Module):
  """`cfg.num_layers` residual blocks applied in order: a list, or one stacked block scanned
  (`cfg.scan_layers`), each rematerialised as `cfg.remat` says."""

  def __init__(self, cfg, *, rngs, causal=True):
    self.cfg = cfg
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs, causal)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, causal=causal)
                              for _ in range(cfg.num_layers)])

  def __call__(self, x_BxLxD, dropout_key=None, kv_mask_BxL=None, segment_ids_BxL=None,
               positions_BxL=None):
    """`dropout_key`: the blocks' dropout and stochastic depth key; without it both are off.
    `kv_mask_BxL`: the keys attention may see (bool, e.g. not padding); `segment_ids_BxL`: the
    packed documents, a token attending to its own only; `positions_BxL`: each token's position
    in its document (rope). The same in every layer; None: all keys, one document, 0 .. L-1."""
    cfg = self.cfg
    depth_N = None  # (key, rate) of each layer
    if dropout_key is not None and cfg.stochastic_depth > 0:  # rate 0: today's dropout keys
      dropout_key, depth_key = jax.random.split(dropout_key)
      depth_N = (jax.random.split(depth_key, cfg.num_layers),
                 jnp.asarray(depth_rates(cfg.stochastic_depth, cfg.num_layers)))
    keys_N = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    # Every layer reads the same masks: closed over by a scan, not scanned.
    inputs = dict(kv_mask_BxL=kv_mask_BxL, segment_ids_BxL=segment_ids_BxL,
                  positions_BxL=positions_BxL)
    apply = lambda block, x, key, depth, inputs: block(x, key, depth, **inputs)
    if cfg.remat != 'none':
      # Under scan there is no common subexpression to protect: XLA cannot hoist across steps.
      apply = nnx.remat(apply, policy=remat_policy(cfg), prevent_cse=not cfg.scan_layers)
    stages = pipeline.num_stages()
    if stages > 1:
      return self._pipelined(apply, stages, x_BxLxD, keys_N, depth_N, inputs)
    if cfg.scan_layers:
      return self._scan(apply, self.layers, x_BxLxD, keys_N, depth_N, inputs)
    for i, block in enumerate(self.layers):
      x_BxLxD = apply(block, x_BxLxD, _layer(keys_N, i), _layer(depth_N, i), inputs)
    return x_BxLxD

  @staticmethod
  def _scan(apply, stacked, x_BxLxD, keys_N, depth_N, inputs):
    scan = nnx.scan(apply, in_axes=(0, nnx.Carry, 0, 0, None), out_axes=nnx.Carry,
                    transform_metadata=_LAYERS)
    return scan(stacked, x_BxLxD, keys_N, depth_N, inputs)

  def _pipelined(self, apply, stages, x_BxLxD, keys_N, depth_N, inputs):
    """The layers as `stages` consecutive groups over the mesh's `stage` axis, in
    `cfg.pipeline_microbatches` micro-batches (parallel/pipeline.py). Unscanned layers are
    stacked here (each device still holds them all: scan_layers stores them split)."""
    cfg = self.cfg
    graphdef, params_N = nnx.split(self.layers if cfg.scan_layers else self.layers[0])
    if not cfg.scan_layers:
      params_N = jax.tree.map(lambda *a: jnp.stack(a),
                              *(nnx.state(block) for block in self.layers))
    per_stage = cfg.num_layers // stages

    def stage(args, x_bxLxD, inputs, micro):
      params, keys, depth = args
      keys = None if keys is None else jax.vmap(jax.random.fold_in, (0, None))(keys, micro)
      if depth is not None:
        depth = (jax.vmap(jax.random.fold_in, (0, None))(depth[0], micro), depth[1])
      if cfg.scan_layers:
        return self._scan(apply, nnx.merge(graphdef, params), x_bxLxD, keys, depth, inputs)
      for i in range(per_stage):
        block = nnx.merge(graphdef, _layer(params, i))
        x_bxLxD = apply(block, x_bxLxD, _layer(keys, i), _layer(depth, i), inputs)
      return x_bxLxD

    microbatches = cfg.get('pipeline_microbatches', 0) or stages
    return pipeline.gpipe(stage, pipeline.by_stage((params_N, keys_N, depth_N), stages),
                          x_BxLxD, inputs, microbatches)

  def init_cache(self, batch: int, length: int) -> list:
    """An empty key/value cache of `length` positions for `batch` rows: one {'key', 'value'}
    per layer, or one with a leading layer axis when the blocks are scanned."""
    cfg = self.cfg
    shape = (batch, length, cfg.num_kv_heads, cfg.embed_dim // cfg.num_heads)
    if cfg.scan_layers:
      shape = (cfg.num_layers, *shape)
    empty = lambda: {'key': jnp.zeros(shape, cfg.dtype), 'value': jnp.zeros(shape, cfg.dtype)}
    return empty() if cfg.scan_layers else [empty() for _ in range(cfg.num_layers)]

  def decode(self, x_BxTxD, positions_BxT, cache):
    """The blocks for T new tokens against `cache` (`init_cache`): (output, the new cache)."""
    if self.cfg.scan_layers:
      step = lambda block, x, layer_cache: block.decode(x, positions_BxT, layer_cache)
      scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata=_LAYERS)
      return scan(self.layers, x_BxTxD, cache)
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x_BxTxD, layer_cache = block.decode(x_BxTxD, positions_BxT, layer_cache)
      new_cache.append(layer_cache)
    return x_BxTxD, new_cache
