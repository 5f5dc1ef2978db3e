"""XLA:CPU kernels behind the shared layers (`models/layers.py`); TPU and GPU never take them.

A model resolved for the CPU (`models/platforms.py`) gets them from its layers: Dense layers use
`dot_general`, attention is `attention`, tied logits are `attend`. Model files never call this
module. `benchmarks/check_numerics.py` checks they leave the model's math unchanged.

XLA:CPU's default matmul library (YNNPACK) only takes [M, K] x [K, N] operands, so the backward
pass of every dense layer (weight gradient x^T @ g) and of attention (dK, dV) first materialises
a transposed operand, fused with its producer and slow (strided reads).
- `_dense` computes a weight gradient as one contraction over the flattened batch.
- `project` runs projections that share an input (query/key/value, SwiGLU gate/up) as one
  matmul on the concatenated kernels; the parameters stay separate.
- `attention` computes `jax.nn.dot_product_attention` (optionally with a key padding mask and
  packed documents' segment ids) on [batch, kv head, query, head dim] operands with a
  backward pass whose two products over the query axis take an explicit transposed copy
  (cheaper than a batched matmul reading a transposed operand).
- `attend` (tied-embedding logits) uses `_dense` too.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def _transposed(x):
  """x with its last two axes swapped, as a real copy that XLA can't fold into the matmul it
  feeds (the matmul then reads both operands in order)."""
  return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def _dense(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
  return _dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
  x, kernel = residuals
  grad_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  # One [tokens, in] x [tokens, out] contraction: no transposes, no batch dims to canonicalise.
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return grad_x, lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))


_dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
  """`lax.dot_general` with the CPU-friendly weight gradient for plain `x @ kernel` layers."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  is_dense = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
              and rhs.ndim == 2 and batch == ((), ()))
  if not is_dense or precision or preferred_element_type or out_sharding:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)
  return _dense(lhs, rhs)


def project(x, layers):
  """`[layer(x) for layer in layers]` for `nnx.Linear` layers sharing the input `x`.

  With the CPU matmul, one matmul against the concatenated kernels: the same products, a third
  of the calls.
  """
  first = layers[0]
  fusable = len(layers) > 1 and all(
      layer.dot_general is dot_general and layer.precision is None
      and layer.preferred_element_type is None and layer.kernel.ndim == 2
      and (layer.bias is None) == (first.bias is None)
      and getattr(layer, 'lora_a', None) is None for layer in layers)  # adapters: own term
  if not fusable:
    return [layer(x) for layer in layers]
  x, *kernels = first.promote_dtype((x, *(layer.kernel[...] for layer in layers)),
                                    dtype=first.dtype)
  y = _dense(x, jnp.concatenate(kernels, axis=1))
  if first.bias is not None:
    y += jnp.concatenate([layer.bias[...] for layer in layers]).astype(y.dtype)
  widths = [k.shape[1] for k in kernels]
  return jnp.split(y, [sum(widths[:i + 1]) for i in range(len(widths) - 1)], axis=-1)


def attend(embed, x):
  """`embed.attend(x)` (tied-embedding logits), with `_dense`'s weight gradient."""
  x, table = embed.promote_dtype((x, embed.embedding[...]), dtype=embed.dtype)
  return _dense(x, table.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, masks, probs_fn):
  """probs_fn(q @ k^T, masks) @ v over [B, G, Q, H] x [B, G, S, H] x [B, G, S, H].

  `masks` (kv_mask [B, S] bool, segment_ids [B, S] int; either None) is an argument, not part
  of `probs_fn`: a nondiff argument must be static, and the masks are traced arrays.
  """
  return _attention_core_fwd(q, k, v, masks, probs_fn)[0]


def _attention_core_fwd(q, k, v, masks, probs_fn):
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum('bgqh,bgsh->bgqs', q, k, preferred_element_type=logits_dtype)
  probs, probs_vjp = jax.vjp(lambda logits: probs_fn(logits, masks), logits)
  return jnp.einsum('bgqs,bgsh->bgqh', probs, v), (q, k, v, probs, probs_vjp)


def _attention_core_bwd(probs_fn, residuals, d_out):
  """Autodiff's backward pass, with the two products over the query axis (dK, dV) written as
  transpose-then-matmul."""
  del probs_fn
  q, k, v, probs, probs_vjp = residuals
  d_probs = jnp.einsum('bgqh,bgsh->bgqs', d_out, v)
  d_logits = probs_vjp(d_probs)[0].astype(q.dtype)
  d_q = jnp.einsum('bgqs,bgsh->bgqh', d_logits, k)
  d_k = jnp.einsum('bgsq,bgqh->bgsh', _transposed(d_logits), q)
  d_v = jnp.einsum('bgsq,bgqh->bgsh', _transposed(probs), d_out)
  return d_q, d_k, d_v, None  # the masks have no gradient


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _probs(logits, masks, *, r, t, h, causal, dtype):
  """Scaled, masked softmax in float32, as `jax.nn.dot_product_attention` computes it: masked
  logits become a large finite negative, so a row with every key masked is uniform, not NaN.
  The masks are and-ed into one [B, 1, R*T, S] (or smaller) boolean, applied once."""
  kv_mask, segment_ids = masks
  logits = logits * jnp.array(1.0 / math.sqrt(h), logits.dtype)
  keep = None  # broadcasts against logits [B, G, R*T, S]
  if causal:
    s = logits.shape[-1]
    keep = jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool)), (r, t, s)).reshape(r * t, s)
  if kv_mask is not None:
    keep = _and(keep, kv_mask[:, None, None, :])
  if segment_ids is not None:  # query row j*T + i is token i (of the group's head j)
    q_ids_BxRT = jnp.tile(segment_ids, (1, r))
    keep = _and(keep, (q_ids_BxRT[:, :, None] == segment_ids[:, None, :])[:, None])
  if keep is not None:
    big_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits = jnp.where(keep, logits, jnp.asarray(big_negative, logits.dtype))
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _and(a, b):
  return b if a is None else a & b


def attention(query, key, value, is_causal=False, kv_mask=None, segment_ids=None):
  """`jax.nn.dot_product_attention(query, key, value, is_causal=..., mask=...)` with its default
  scale; `kv_mask` [B, S] (bool, True = attend) masks keys; `segment_ids` [B, S] (int) lets a
  token attend only to tokens of its own segment (self-attention: queries and keys alike).

  Query heads N = G * R share kv head g in groups of R; the R*T query rows of a kv head form one
  matrix, so every matmul is [B, G] batches of plain 2-D products.
  """
  b, t, n, h = query.shape
  g = key.shape[2]
  r = n // g
  q = query.reshape(b, t, g, r, h).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, h)
  k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, G, S, H]
  probs_fn = functools.partial(_probs, r=r, t=t, h=h, causal=is_causal, dtype=key.dtype)
  out = _attention_core(q, k, v, (kv_mask, segment_ids), probs_fn)
  return out.reshape(b, g, r, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
