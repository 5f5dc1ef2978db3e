"""Layers shared by the Transformer models (decoder, encoder, ViT), in Flax NNX.

Each layer takes the platform's fastest path itself: on CPU (`cfg.platform == 'cpu'`) matmuls,
shared-input projections, attention and tied logits go through `models/cpu_kernels.py`, so a
model file never names a platform. Parameters carry logical axis names in their
`logical_axes` metadata and activations are constrained by logical names; `parallel/sharding.py`
maps both to the mesh.

Tensor names carry their shapes: B batch, L length, D embed, H heads, G kv heads, K head dim,
F mlp, V vocab.

Memory levers (config keys): `scan_layers` stacks the blocks (leading logical axis 'layers')
and runs them as one scanned body, so compile time does not grow with depth; `remat` recomputes
each block's activations in the backward pass, all of them or all but those a policy keeps.

LoRA (models/lora.py): with `cfg.lora_rank` > 0, the dense layers named in `cfg.lora_targets`
add low-rank adapters, y = x W + lora_alpha / lora_rank * (x A) B, with A [in, rank] drawn
small and B [rank, out] zero, so the adapted model starts as the base model.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from models import attention, checks, cpu_kernels, initializers, lora, platforms, rotary
from parallel.sharding import constrain

# Activations tagged with `checkpoint_name`, for remat='names' to keep (`model.remat_names`).
REMAT_NAMES = ('query_proj', 'key_proj', 'value_proj',  # [B, L, H|G, K], after rotary
               'attention_context',  # the kernel's output [B, L, H, K]: keeps attention unredone
               'attention_out', 'mlp_hidden', 'mlp_out')  # [B, L, D], [B, L, F], [B, L, D]
REMAT = ('none', 'full', 'dots', 'names')
# Stacked (scanned) blocks: each parameter's leading axis is the layer, logical name 'layers'.


def default_config() -> ml_collections.ConfigDict:
  """The keys these layers read, at CPU scale; a model adds its own and changes sizes."""
  m = ml_collections.ConfigDict()
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.embed_dim = 128
  m.mlp_dim = 512
  m.max_len = 128
  m.position = 'learned'  # learned | rope
  m.rope_theta = 10000.0
  # position=rope: none | llama3 (Llama 3.1's long-context frequencies, models/rotary.py).
  m.rope_scaling = 'none'
  m.rope_factor = 8.0  # llama3: low frequencies are divided by this (the context's growth)
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths > original_max_len / this are divided
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths < original_max_len / this are kept
  m.rope_original_max_len = 8192  # llama3: the context length the model was pretrained at
  m.norm = 'layernorm'  # layernorm | rmsnorm
  m.norm_eps = 1e-5  # added to the variance in every norm (HF: layer_norm_epsilon, rms_norm_eps)
  m.mlp = 'gelu'  # gelu (two layers, `activation` between) | swiglu
  m.activation = 'gelu'  # mlp=gelu: relu | gelu (tanh-approximated) | gelu_exact (erf) | ...
  # pre: x + branch(norm(x)) (GPT-2, Llama, ViT) | post: norm(x + branch(x)) (BERT; the encoder
  # only, which then also norms the embeddings and has no final norm).
  m.norm_position = 'pre'
  m.use_bias = True
  m.dropout_rate = 0.0
  # The last block's probability of skipping each residual branch of an example in training,
  # rising linearly from 0 at the first block (stochastic depth, Huang et al. 2016, as DeiT).
  m.stochastic_depth = 0.0
  m.init = 'normal'  # dense kernels: an initializer of checks.INITS
  m.init_std = 0.02  # embeddings and positions, and init 'normal' | 'truncated_normal'
  # Residual-output projections (attention out, MLP down) drawn (2 num_layers)^-1/2 times the
  # init's standard deviation, as GPT-2, so the residual stream's variance is independent of depth.
  m.init_depth_scaled = True
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  m.scan_layers = False  # one scanned layer body: compile time independent of depth
  m.remat = 'none'  # none | full | dots (save matmul outputs) | names (save `remat_names`)
  m.remat_names = ('attention_out', 'mlp_out')  # kept by remat=names (REMAT_NAMES)
  # auto | cpu | xla | cudnn | splash (auto: splash on TPU, cudnn on GPU, cpu on CPU)
  m.attention = 'auto'
  return m


def learned_positions(cfg, rngs) -> nnx.Param:
  """A learned position embedding [max_len, D], added to the tokens by the model."""
  init = nnx.initializers.normal(cfg.init_std)
  return nnx.Param(init(rngs.params(), (cfg.max_len, cfg.embed_dim), cfg.param_dtype),
                   logical_axes=('length', 'embed'))


def validate(m, norm_positions=('pre',)):
  """Checks the keys the shared layers read; raises ValueError('model.<key>: ...').
  `norm_positions`: the ones the calling model supports."""
  checks.one_of(m, 'norm_position', norm_positions)
  checks.one_of(m, 'position', ('learned', 'rope'))
  checks.one_of(m, 'norm', ('layernorm', 'rmsnorm'))
  checks.one_of(m, 'mlp', ('gelu', 'swiglu'))
  checks.one_of(m, 'activation', checks.ACTIVATIONS)
  checks.require(m.mlp == 'gelu' or m.activation == 'gelu', 'model.activation',
                 f'{m.activation!r} needs model.mlp=gelu (the plain MLP); swiglu gates with silu')
  checks.dtypes_and_dropout(m)
  checks.rate(m, 'stochastic_depth')
  checks.init(m, 'init')
  checks.positive(m, 'num_layers', 'num_heads', 'num_kv_heads', 'embed_dim', 'mlp_dim', 'max_len',
                  'norm_eps')
  checks.require(m.embed_dim % m.num_heads == 0, 'model.embed_dim',
                 f'{m.embed_dim} is not divisible by model.num_heads={m.num_heads}')
  checks.require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads',
                 f'{m.num_kv_heads} does not divide model.num_heads={m.num_heads}')
  checks.require(m.position != 'rope' or (m.embed_dim // m.num_heads) % 2 == 0, 'model.num_heads',
                 'rope needs an even head dimension (embed_dim / num_heads)')
  rotary.validate(m)
  checks.one_of(m, 'remat', REMAT)
  unknown = sorted(set(m.remat_names) - set(REMAT_NAMES))
  checks.require(not unknown, 'model.remat_names',
                 f'unknown {", ".join(unknown)}; tagged are {", ".join(REMAT_NAMES)}')
  checks.one_of(m, 'attention', ('auto', *platforms.ATTENTION))


def lora_targets(m) -> tuple[str, ...]:
  """The LoRA targets a model built from these layers has (a gate only with SwiGLU)."""
  return tuple(t for t in lora.TARGETS if t != 'gate' or m.mlp == 'swiglu')


def _output_scale(cfg) -> float:
  return (2 * cfg.num_layers) ** -0.5 if cfg.init_depth_scaled else 1.0


def depth_rates(rate: float, n: int) -> np.ndarray:
  """Stochastic depth's drop rate of each of `n` residual blocks: linear from 0 at the first
  to `rate` at the last (a single block: `rate`)."""
  return np.linspace(0, rate, n, dtype=np.float32) if n > 1 else np.full(1, rate, np.float32)


def drop_path(y_Bx, rate, key):
  """Stochastic depth on a residual branch `y_Bx`: each example's branch zeroed with
  probability `rate`, the survivors scaled by 1 / (1 - rate) so the expectation is unchanged.
  `key` None (evaluation): `y_Bx` as it is."""
  if key is None:
    return y_Bx
  keep_B = jax.random.bernoulli(key, 1 - rate, y_Bx.shape[:1])
  scale_B = jnp.where(keep_B, 1 / (1 - rate), 0).astype(y_Bx.dtype)
  return y_Bx * scale_B.reshape(-1, *(1,) * (y_Bx.ndim - 1))


def _axes(*names):
  return {'logical_axes': names}


class Dense(nnx.Linear):
  """`nnx.Linear` with logical axes on its parameters and the backend's best matmul; with LoRA
  adapters when `adapter` is one of `cfg.lora_targets`."""

  def __init__(self, d_in, d_out, in_axis, out_axis, cfg, *, rngs, init=None, init_scale=1.0,
               preferred_element_type=None, adapter=None):
    """`init`: the kernel's initializer name (models/initializers.py); None: `cfg.init`.
    `adapter`: this layer's name among lora.TARGETS, if it is one."""
    # The platform, not the host: an AOT compile for TPU on a CPU host takes the TPU path.
    dot_general = cpu_kernels.dot_general if cfg.platform == 'cpu' else lax.dot_general
    super().__init__(
        d_in, d_out, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=initializers.kernel(init or cfg.init, cfg.init_std, init_scale),
        dot_general=dot_general, preferred_element_type=preferred_element_type,
        kernel_metadata=_axes(in_axis, out_axis), bias_metadata=_axes(out_axis), rngs=rngs)
    if adapter not in cfg.get('lora_targets', ()):
      self.lora_a = self.lora_b = None
    else:
      rank = cfg.lora_rank
      # A as PEFT draws it (Kaiming-uniform, variance 1 / (3 d_in)); B zero: no change at step 0.
      init_a = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
      self.lora_a = nnx.Param(init_a(rngs.params(), (d_in, rank), cfg.param_dtype),
                              logical_axes=(in_axis, 'lora'))
      self.lora_b = nnx.Param(jnp.zeros((rank, d_out), cfg.param_dtype),
                              logical_axes=('lora', out_axis))
      self.lora_scale = cfg.lora_alpha / rank

  def __call__(self, x):
    y = super().__call__(x)
    if self.lora_a is None:
      return y
    x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    return y + (x @ a @ b) * jnp.asarray(self.lora_scale, y.dtype)


def norm(cfg, rngs):
  if cfg.norm == 'layernorm':
    return nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, use_bias=cfg.use_bias,
                         dtype=cfg.dtype, param_dtype=cfg.param_dtype, scale_metadata=_axes('norm'),
                         bias_metadata=_axes('norm'), rngs=rngs)
  return nnx.RMSNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, scale_metadata=_axes('norm'), rngs=rngs)


class Attention(nnx.Module):
  """Self-attention with grouped-query heads (num_kv_heads == num_heads is plain MHA), causal
  for a decoder, bidirectional for an encoder."""

  def __init__(self, cfg, *, rngs, causal=True):
    self.cfg, self.causal = cfg, causal
    d, k = cfg.embed_dim, cfg.embed_dim // cfg.num_heads
    self.query = Dense(d, cfg.num_heads * k, 'embed', 'heads', cfg, rngs=rngs, adapter='query')
    self.key = Dense(d, cfg.num_kv_heads * k, 'embed', 'heads', cfg, rngs=rngs, adapter='key')
    self.value = Dense(d, cfg.num_kv_heads * k, 'embed', 'heads', cfg, rngs=rngs,
                       adapter='value')
    self.out = Dense(cfg.num_heads * k, d, 'heads', 'embed', cfg, rngs=rngs,
                     init_scale=_output_scale(cfg), adapter='out')

  def _project(self, x_BxLxD, positions_BxL=None):
    """Queries [B, L, H, K], keys and values [B, L, G, K] of tokens at `positions_BxL`."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    k = cfg.embed_dim // cfg.num_heads
    q_BxLxHK, k_BxLxGK, v_BxLxGK = cpu_kernels.project(x_BxLxD, (self.query, self.key, self.value))
    q_BxLxHxK = q_BxLxHK.reshape(b, l, cfg.num_heads, k)
    k_BxLxGxK = k_BxLxGK.reshape(b, l, cfg.num_kv_heads, k)
    v_BxLxGxK = v_BxLxGK.reshape(b, l, cfg.num_kv_heads, k)
    if cfg.position == 'rope':
      freq_K2 = rotary.frequencies(cfg, k)
      q_BxLxHxK = rotary.rotate(q_BxLxHxK, freq_K2, positions_BxL)
      k_BxLxGxK = rotary.rotate(k_BxLxGxK, freq_K2, positions_BxL)
    return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

  def __call__(self, x_BxLxD, kv_mask_BxL=None, segment_ids_BxL=None, positions_BxL=None):
    """`kv_mask_BxL`: keys to attend to (bool, e.g. not padding); None: all of them.
    `segment_ids_BxL`: packed documents; a token attends to its own only (models/attention.py).
    `positions_BxL`: each token's position in its document (rope); None: 0 .. L-1."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._project(x_BxLxD, positions_BxL)
    k = q_BxLxHxK.shape[-1]
    q_BxLxHxK = constrain(checkpoint_name(q_BxLxHxK, 'query_proj'), 'batch', 'length', 'heads',
                          'kv')
    k_BxLxGxK = checkpoint_name(k_BxLxGxK, 'key_proj')
    v_BxLxGxK = checkpoint_name(v_BxLxGxK, 'value_proj')
    out_BxLxHxK = attention.attention(cfg.attention, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                      causal=self.causal, kv_mask_BxL=kv_mask_BxL,
                                      segment_ids_BxL=segment_ids_BxL)
    out_BxLxHxK = checkpoint_name(out_BxLxHxK, 'attention_context')
    out_BxLxD = self.out(out_BxLxHxK.reshape(b, l, cfg.num_heads * k))
    return checkpoint_name(out_BxLxD, 'attention_out')

  def decode(self, x_BxTxD, positions_BxT, cache):
    """T new tokens per row at `positions_BxT`, attending causally to themselves and to the
    earlier keys in `cache` ({'key', 'value'}: [B, C, G, K]); their keys and values go into the
    cache at those positions. Returns (output [B, T, D], the new cache). Positions past a row's
    tokens hold stale entries; no query sees them, as a query sees positions up to its own."""
    b, t, _ = x_BxTxD.shape
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._project(x_BxTxD, positions_BxT)
    rows_Bx1 = jnp.arange(b)[:, None]
    cache = {'key': cache['key'].at[rows_Bx1, positions_BxT].set(k_BxTxGxK),
             'value': cache['value'].at[rows_Bx1, positions_BxT].set(v_BxTxGxK)}
    length = cache['key'].shape[1]
    visible_BxTxC = jnp.arange(length)[None, None, :] <= positions_BxT[:, :, None]
    out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, cache['key'], cache['value'],
                                               mask=visible_BxTxC[:, None], implementation='xla')
    return self.out(out_BxTxHxK.reshape(b, t, -1)), cache


class Mlp(nnx.Module):
  """Two-layer MLP (GPT-2, with `cfg.activation`, GELU) or SwiGLU (Llama)."""

  def __init__(self, cfg, *, rngs):
    self.gated = cfg.mlp == 'swiglu'
    self.up = Dense(cfg.embed_dim, cfg.mlp_dim, 'embed', 'mlp', cfg, rngs=rngs, adapter='up')
    if self.gated:
      self.gate = Dense(cfg.embed_dim, cfg.mlp_dim, 'embed', 'mlp', cfg, rngs=rngs,
                        adapter='gate')
    self.down = Dense(cfg.mlp_dim, cfg.embed_dim, 'mlp', 'embed', cfg, rngs=rngs,
                      init_scale=_output_scale(cfg), adapter='down')
    self.activation = checks.ACTIVATIONS[cfg.activation]  # gelu: tanh-approximated, as GPT-2

  def __call__(self, x_BxLxD):
    if self.gated:
      gate_BxLxF, up_BxLxF = cpu_kernels.project(x_BxLxD, (self.gate, self.up))
      h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = self.activation(self.up(x_BxLxD))
    h_BxLxF = checkpoint_name(constrain(h_BxLxF, 'batch', 'length', 'mlp'), 'mlp_hidden')
    return checkpoint_name(self.down(h_BxLxF), 'mlp_out')


class Block(nnx.Module):
  """Residual block, pre-norm: x + attn(norm(x)), then x + mlp(norm(x)); or post-norm
  (`cfg.norm_position='post'`): norm(x + attn(x)), then norm(x + mlp(x)). Each branch with
  dropout and stochastic depth."""

  def __init__(self, cfg, *, rngs, causal=True):
    self.post = cfg.norm_position == 'post'
    self.attn_norm, self.attention = norm(cfg, rngs), Attention(cfg, rngs=rngs, causal=causal)
    self.mlp_norm, self.mlp = norm(cfg, rngs), Mlp(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x_BxLxD, dropout_key=None, depth=None, **attention_inputs):
    """`dropout_key`: this layer's dropout key; without it dropout is off. `depth`: (key, rate)
    of this layer's stochastic depth; without it every branch is kept. `attention_inputs`:
    kv_mask_BxL, segment_ids_BxL, positions_BxL (Attention)."""
    keys = [None, None] if dropout_key is None else jax.random.split(dropout_key)
    depth_keys, rate = [None, None], 0.0
    if depth is not None:
      depth_keys, rate = jax.random.split(depth[0]), depth[1]
    def branch(y, i):
      y = self.dropout(y, deterministic=keys[i] is None, rngs=keys[i])
      return drop_path(y, rate, depth_keys[i])
    if self.post:
      x_BxLxD = self.attn_norm(x_BxLxD + branch(self.attention(x_BxLxD, **attention_inputs), 0))
      x_BxLxD = self.mlp_norm(x_BxLxD + branch(self.mlp(x_BxLxD), 1))
    else:
      x_BxLxD = x_BxLxD + branch(self.attention(self.attn_norm(x_BxLxD), **attention_inputs), 0)
      x_BxLxD = x_BxLxD + branch(self.mlp(self.mlp_norm(x_BxLxD)), 1)
    return constrain(x_BxLxD, 'batch', 'length', 'embed')

  def decode(self, x_BxTxD, positions_BxT, cache):
    """The block for T new tokens against a key/value cache (Attention.decode); pre-norm only
    (decoders validate norm_position='pre')."""
    y_BxTxD, cache = self.attention.decode(self.attn_norm(x_BxTxD), positions_BxT, cache)
    x_BxTxD = x_BxTxD + y_BxTxD
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), cache


class Embed(nnx.Embed):
  """`nnx.Embed` with logical axes; `attend` (tied logits) takes the platform's best matmul."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype,
                     embedding_init=nnx.initializers.normal(cfg.init_std),
                     embedding_metadata=_axes('vocab', 'embed'), rngs=rngs)
    self.platform = cfg.platform

  def attend(self, x_BxLxD):
    """Hidden states [B, L, D] -> logits [B, L, V] against the embedding table, in float32."""
    if self.platform == 'cpu' and x_BxLxD.dtype == jnp.float32:
      return cpu_kernels.attend(self, x_BxLxD)  # its CPU weight gradient
    table_VxD = self.embedding[...].astype(x_BxLxD.dtype)
    return jnp.einsum('bld,vd->blv', x_BxLxD, table_VxD, preferred_element_type=jnp.float32)
