"""Decoder-only Transformer in Flax NNX, GPT-2 style or Llama style.

GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
Llama: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
Each choice is its own config key, so mixtures work too.

Tensor names carry their shapes: B batch, L length, D embed, H heads, G kv heads, K head dim,
F mlp, V vocab. Parameters carry logical axis names in their `logical_axes` metadata, and
activations are constrained with logical names; `parallel/sharding.py` maps both to the mesh.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parallel import cpu_backend
from parallel.sharding import constrain


def _axes(*names):
  return {'logical_axes': names}


class Dense(nnx.Linear):
  """`nnx.Linear` with logical axes on its parameters and the backend's best matmul."""

  def __init__(self, d_in, d_out, in_axis, out_axis, cfg, *, rngs, init_scale=1.0):
    super().__init__(
        d_in, d_out, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02 * init_scale),
        dot_general=cpu_backend.dense_dot_general(),
        kernel_metadata=_axes(in_axis, out_axis), bias_metadata=_axes(out_axis), rngs=rngs)


def _norm(cfg, rngs):
  if cfg.norm == 'layernorm':
    return nnx.LayerNorm(cfg.embed_dim, epsilon=1e-5, use_bias=cfg.use_bias, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, scale_metadata=_axes('norm'),
                         bias_metadata=_axes('norm'), rngs=rngs)
  return nnx.RMSNorm(cfg.embed_dim, epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     scale_metadata=_axes('norm'), rngs=rngs)


def rotary(x_BxLxNxK, theta):
  """Rotary position embedding over the last axis (halves rotated, as in GPT-NeoX/Llama)."""
  length, head_dim = x_BxLxNxK.shape[1], x_BxLxNxK.shape[-1]
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * freq[None, :]
  sin, cos = jnp.sin(angle_LxK2)[:, None, :], jnp.cos(angle_LxK2)[:, None, :]
  x1, x2 = jnp.split(x_BxLxNxK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxK.dtype)


class Attention(nnx.Module):
  """Causal self-attention with grouped-query heads (num_kv_heads == num_heads is plain MHA)."""

  def __init__(self, cfg, *, rngs):
    self.cfg = cfg
    d, k = cfg.embed_dim, cfg.embed_dim // cfg.num_heads
    self.query = Dense(d, cfg.num_heads * k, 'embed', 'heads', cfg, rngs=rngs)
    self.key = Dense(d, cfg.num_kv_heads * k, 'embed', 'heads', cfg, rngs=rngs)
    self.value = Dense(d, cfg.num_kv_heads * k, 'embed', 'heads', cfg, rngs=rngs)
    self.out = Dense(cfg.num_heads * k, d, 'heads', 'embed', cfg, rngs=rngs,
                     init_scale=(2 * cfg.num_layers) ** -0.5)

  def __call__(self, x_BxLxD):
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    k = cfg.embed_dim // cfg.num_heads
    q_BxLxHK, k_BxLxGK, v_BxLxGK = cpu_backend.project(x_BxLxD, (self.query, self.key, self.value))
    q_BxLxHxK = q_BxLxHK.reshape(b, l, cfg.num_heads, k)
    k_BxLxGxK = k_BxLxGK.reshape(b, l, cfg.num_kv_heads, k)
    v_BxLxGxK = v_BxLxGK.reshape(b, l, cfg.num_kv_heads, k)
    if cfg.position == 'rope':
      q_BxLxHxK, k_BxLxGxK = rotary(q_BxLxHxK, cfg.rope_theta), rotary(k_BxLxGxK, cfg.rope_theta)
    q_BxLxHxK = constrain(q_BxLxHxK, 'batch', 'length', 'heads', 'kv')
    attention = cpu_backend.attention_fn()
    out_BxLxHxK = attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True)
    return self.out(out_BxLxHxK.reshape(b, l, cfg.num_heads * k))


class Mlp(nnx.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama)."""

  def __init__(self, cfg, *, rngs):
    self.gated = cfg.mlp == 'swiglu'
    self.up = Dense(cfg.embed_dim, cfg.mlp_dim, 'embed', 'mlp', cfg, rngs=rngs)
    if self.gated:
      self.gate = Dense(cfg.embed_dim, cfg.mlp_dim, 'embed', 'mlp', cfg, rngs=rngs)
    self.down = Dense(cfg.mlp_dim, cfg.embed_dim, 'mlp', 'embed', cfg, rngs=rngs,
                      init_scale=(2 * cfg.num_layers) ** -0.5)

  def __call__(self, x_BxLxD):
    if self.gated:
      gate_BxLxF, up_BxLxF = cpu_backend.project(x_BxLxD, (self.gate, self.up))
      h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = jax.nn.gelu(self.up(x_BxLxD), approximate=True)
    return self.down(constrain(h_BxLxF, 'batch', 'length', 'mlp'))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg, *, rngs):
    self.attn_norm, self.attention = _norm(cfg, rngs), Attention(cfg, rngs=rngs)
    self.mlp_norm, self.mlp = _norm(cfg, rngs), Mlp(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x_BxLxD, rngs):
    drop = lambda y: self.dropout(y, deterministic=rngs is None, rngs=rngs)
    x_BxLxD = x_BxLxD + drop(self.attention(self.attn_norm(x_BxLxD)))
    x_BxLxD = x_BxLxD + drop(self.mlp(self.mlp_norm(x_BxLxD)))
    return constrain(x_BxLxD, 'batch', 'length', 'embed')


class Transformer(nnx.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embed_init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, embedding_init=embed_init,
                           embedding_metadata=_axes('vocab', 'embed'), rngs=rngs)
    if cfg.position == 'learned':
      self.positions = nnx.Param(embed_init(rngs.params(), (cfg.max_len, cfg.embed_dim),
                                            cfg.param_dtype), **_axes('length', 'embed'))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.unembed = Dense(cfg.embed_dim, cfg.vocab_size, 'embed', 'vocab', cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, tokens_BxL, *, rngs: nnx.Rngs | None = None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation)."""
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.position == 'learned':
      x_BxLxD = x_BxLxD + self.positions[: tokens_BxL.shape[1]].astype(x_BxLxD.dtype)
    x_BxLxD = self.dropout(x_BxLxD, deterministic=rngs is None, rngs=rngs)
    x_BxLxD = constrain(x_BxLxD, 'batch', 'length', 'embed')
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, rngs)
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.cfg.tie_embeddings:
      logits_BxLxV = cpu_backend.attend(self.embed, x_BxLxD)
    else:
      logits_BxLxV = self.unembed(x_BxLxD)
    return constrain(logits_BxLxV.astype(jnp.float32), 'batch', 'length', 'vocab')
