"""Decoder-only Transformer in Flax NNX, GPT-2 style or Llama style.

GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
Llama: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
Each choice is its own config key, so mixtures work too.

Tensor names carry their shapes: B batch, L length, D embed, H heads, G kv heads, K head dim,
F mlp, V vocab. Parameters carry logical axis names in their `logical_axes` metadata, and
activations are constrained with logical names; `parallel/sharding.py` maps both to the mesh.

Memory levers (config keys): `scan_layers` stacks the blocks (leading logical axis 'layers')
and runs them as one scanned body, so compile time does not grow with depth; `remat` recomputes
each block's activations in the backward pass, all of them or all but those a policy keeps;
`attention` picks the kernel (models/attention.py); `hidden` + `logits` let the loss unembed a
few positions at a time. Settings left 'auto' are resolved per platform (models/platforms.py).
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import blocks, checks, flops, layers, platforms
from parallel.sharding import constrain


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`); GPT-2 small-ish at CPU scale."""
  m = layers.default_config()
  m.name = 'transformer'
  m.vocab_size = 256  # bytes; byte 0 separates documents
  m.tie_embeddings = True
  m.loss_chunk = 0  # > 0: logits and loss this many positions at a time (never all of [B,L,V])
  # With pipeline stages (mesh.stage x mesh.dcn_stage > 1): micro-batches of each batch in the
  # GPipe schedule (0: as many as stages); more shrink the bubble, (S-1) / (M+S-1).
  m.pipeline_microbatches = 0
  return m


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  layers.validate(m)
  checks.require(m.vocab_size > 0, 'model.vocab_size', f'must be positive, got {m.vocab_size}')
  checks.require(m.loss_chunk >= 0, 'model.loss_chunk', f'must be >= 0, got {m.loss_chunk}')
  checks.require(m.pipeline_microbatches >= 0, 'model.pipeline_microbatches',
                 f'must be >= 0 (0: one per stage), got {m.pipeline_microbatches}')
  seq_len = config.data.seq_len
  checks.require(not m.loss_chunk or seq_len % m.loss_chunk == 0, 'model.loss_chunk',
           f'{m.loss_chunk} does not divide data.seq_len={seq_len}')
  checks.require(seq_len <= m.max_len, 'data.seq_len',
           f'{seq_len} is longer than model.max_len={m.max_len}')


def validate_stages(m, stages: int, rows: int):
  """`stages` > 1 pipeline stages (parallel/pipeline.py) over `rows` examples per data shard."""
  checks.require(m.num_layers % stages == 0, 'model.num_layers',
                 f'{m.num_layers} is not divisible by the {stages} pipeline stages '
                 '(mesh.stage x mesh.dcn_stage)')
  micro = m.pipeline_microbatches or stages
  checks.require(rows % micro == 0, 'model.pipeline_microbatches',
                 f'{micro} micro-batches do not divide the {rows} examples of each data shard '
                 '(data.global_batch_size / data shards / train.grad_accum_steps)')


validate_sharding = checks.heads_split
lora_targets = layers.lora_targets  # the kernels finetune.lora_targets may name


def train_flops_per_example(m, config) -> float:
  """Training FLOPs of one sequence of `data.seq_len` tokens (models/flops.py)."""
  return config.data.seq_len * flops.train_flops_per_token(m, config.data.seq_len)


def attention_flops_per_example(m, config) -> float:
  """The part of `train_flops_per_example` in attention's score and value products: what a
  Pallas kernel (splash) computes out of XLA's sight (training/aot.py)."""
  return config.data.seq_len * flops.attention_flops_per_token(m, config.data.seq_len)


class Model(nnx.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32).

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    self.embed = layers.Embed(cfg, rngs=rngs)
    if cfg.position == 'learned':
      self.positions = layers.learned_positions(cfg, rngs)
    self.blocks = blocks.Blocks(cfg, rngs=rngs, causal=True)
    self.final_norm = layers.norm(cfg, rngs)
    if not cfg.tie_embeddings:  # 16-bit activations: accumulated and returned in float32
      wide = None if cfg.dtype == 'float32' else jnp.float32
      self.unembed = layers.Dense(cfg.embed_dim, cfg.vocab_size, 'embed', 'vocab', cfg, rngs=rngs,
                           preferred_element_type=wide)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, tokens_BxL, *, segment_ids_BxL=None, positions_BxL=None,
               rngs: nnx.Rngs | None = None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation). For packed
    rows, `segment_ids_BxL` numbers the documents (a token attends to its own document only)
    and `positions_BxL` gives each token's position in its document; None: the row is one
    document at positions 0 .. L-1."""
    return self.logits(self.hidden(tokens_BxL, segment_ids_BxL=segment_ids_BxL,
                                   positions_BxL=positions_BxL, rngs=rngs))

  def hidden(self, tokens_BxL, *, segment_ids_BxL=None, positions_BxL=None,
             rngs: nnx.Rngs | None = None):
    """The final norm's output [B, L, D]: everything but the unembedding."""
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.position == 'learned':
      x_BxLxD = x_BxLxD + (self.positions[: tokens_BxL.shape[1]] if positions_BxL is None
                           else self.positions[positions_BxL]).astype(x_BxLxD.dtype)
    x_BxLxD = self.dropout(x_BxLxD, deterministic=rngs is None, rngs=rngs)
    x_BxLxD = constrain(x_BxLxD, 'batch', 'length', 'embed')
    x_BxLxD = self.blocks(x_BxLxD, None if rngs is None else rngs.dropout(),
                          segment_ids_BxL=segment_ids_BxL, positions_BxL=positions_BxL)
    return self.final_norm(x_BxLxD)

  def init_cache(self, batch: int, length: int):
    """An empty key/value cache for `decode`: `batch` rows of up to `length` positions."""
    return self.blocks.init_cache(batch, length)

  def decode(self, tokens_BxT, positions_BxT, cache):
    """Logits [B, T, V] of T new tokens per row at `positions_BxT`, each attending to the
    tokens before it through `cache` (filled by earlier calls), and the cache with these added.
    Prefill a prompt with T = its length, then sample one token per call."""
    x_BxTxD = self.embed(tokens_BxT)
    if self.cfg.position == 'learned':
      x_BxTxD = x_BxTxD + self.positions[positions_BxT].astype(x_BxTxD.dtype)
    x_BxTxD, cache = self.blocks.decode(x_BxTxD, positions_BxT, cache)
    return self.logits(self.final_norm(x_BxTxD)), cache

  def logits(self, x_BxLxD):
    """Hidden states [B, L, D] (any L) -> logits [B, L, V], accumulated in float32."""
    if not self.cfg.tie_embeddings:
      logits_BxLxV = self.unembed(x_BxLxD)
    else:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    return constrain(logits_BxLxV.astype(jnp.float32), 'batch', 'length', 'vocab')
