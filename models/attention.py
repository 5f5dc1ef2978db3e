"""Attention kernels behind one interface, picked by `model.attention`; causal or bidirectional.

All take query [B, L, H, K] and key/value [B, L, G, K] (G kv heads shared by H/G query heads
each) and return [B, L, H, K], with `jax.nn.dot_product_attention`'s 1/sqrt(K) scale.
  cpu     XLA:CPU's tuned equivalent of `xla` (models/cpu_kernels.py); the default on CPU.
  xla     `jax.nn.dot_product_attention(implementation='xla')`: materialises [B, H, L, L].
  cudnn   cuDNN's fused kernel (GPU, 16-bit activations).
  splash  the Pallas TPU splash kernel: blockwise, never materialises [L, L]; runs per device
          under `jax.shard_map`, batch and heads split as the logical rules split them.

`kv_mask_BxL` (bool, True = attend; None = every key) hides the keys of padding tokens in
self-attention: the query at an unmasked position attends to the unmasked keys only, alike on
every kernel. The output at a masked (padding) position is finite but kernel-dependent, and
nothing else depends on it: cpu and xla attend it to the unmasked keys (to all keys, uniformly,
in an example that is all padding), splash to the padding keys. cuDNN takes padding only as
per-example key counts, so there the unmasked keys must be a prefix of each sequence (padding
at the end).

`segment_ids_BxL` (int; None = one segment) packs several documents into a row: a token
attends only to the tokens of its own segment (and, causal, only to those before it), so its
output does not depend on the other documents in the row. Grain's packing numbers a row's
pieces 1, 2, ... and pads with 0; given with a `kv_mask_BxL`, the padding becomes segment 0,
so padding tokens attend to padding only. cpu builds the mask from the ids inside its kernel,
xla and cudnn take a boolean [B, 1, L, L] (cuDNN accepts a mask only when it spans [L, L]; it
becomes a bias), splash takes the ids as `SegmentIds` and skips no tiles for them.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding, PartitionSpec

from models import cpu_kernels
from parallel import sharding

SPLASH_BLOCK = 512  # tile edge over queries and keys (shorter sequences use one tile)
_LANES = 128  # the kernel's tiles are multiples of the TPU's 128 vector lanes


def attention(kind: str, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, causal: bool = True,
              kv_mask_BxL=None, segment_ids_BxL=None):
  if segment_ids_BxL is not None and kv_mask_BxL is not None:  # padding: segment 0
    segment_ids_BxL, kv_mask_BxL = jnp.where(kv_mask_BxL, segment_ids_BxL, 0), None
  if kind == 'cpu':
    return cpu_kernels.attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=causal,
                                 kv_mask=kv_mask_BxL, segment_ids=segment_ids_BxL)
  if kind in ('xla', 'cudnn'):
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=causal,
                                        implementation=kind,
                                        **masks(kind, kv_mask_BxL, segment_ids_BxL))
  if kind == 'splash':
    return splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, causal=causal,
                            kv_mask_BxL=kv_mask_BxL, segment_ids_BxL=segment_ids_BxL)
  raise ValueError(f'model.attention: unknown kernel {kind!r}')


def masks(kind: str, kv_mask_BxL=None, segment_ids_BxL=None) -> dict:
  """`jax.nn.dot_product_attention`'s arguments for a key mask or segment ids (not both). cuDNN
  rejects a boolean mask that does not span [L, L]; its padding mode takes key counts (padding
  at the end)."""
  if segment_ids_BxL is not None:
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return {'mask': same_BxLxL[:, None]}  # [B, heads, queries, keys]
  if kv_mask_BxL is None:
    return {}
  if kind == 'cudnn':
    return {'key_value_seq_lengths': kv_mask_BxL.sum(axis=1, dtype=jnp.int32)}
  return {'mask': kv_mask_BxL[:, None, None, :]}  # [B, heads, queries, keys], broadcast


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, causal=True, kv_mask_BxL=None,
                     segment_ids_BxL=None, interpret=False):
  """Splash attention over the active mesh; sequences it cannot tile take XLA's path.

  The kernel tiles the sequence in multiples of 128; shorter or ragged sequences (samples,
  smoke tests) are small enough that XLA's [L, L] scores fit, so they fall back to 'xla'.
  `interpret` runs the kernel in Pallas' interpreter, which works on CPU (for tests).
  """
  _, length, num_heads, head_dim = q_BxLxHxK.shape
  if length % _LANES:
    return attention('xla', q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, causal=causal,
                     kv_mask_BxL=kv_mask_BxL, segment_ids_BxL=segment_ids_BxL)
  # The kernel takes [heads, length, head dim] per example and does not scale the scores.
  q_BxHxLxK = (q_BxLxHxK * (1 / math.sqrt(head_dim))).astype(q_BxLxHxK.dtype).swapaxes(1, 2)
  k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.swapaxes(1, 2), v_BxLxGxK.swapaxes(1, 2)
  mesh = jax.sharding.get_abstract_mesh()
  spec = _spec(mesh, 'batch', 'heads', 'length', 'kv')
  head_shards = _ways(mesh, spec[1])
  kernel = _kernel(length, num_heads, head_shards, causal, interpret)
  operands, specs = (q_BxHxLxK, k_BxGxLxK, v_BxGxLxK), (spec, spec, spec)
  if kv_mask_BxL is not None:
    # Padding is its own segment (0), apart from the tokens (1): a query sees the keys of its
    # own segment, so no query has every key masked, which the kernel requires (its backward
    # pass would be wrong for such a row). Segments skip no work: masked tiles are computed.
    tokens = 1 if segment_ids_BxL is None else segment_ids_BxL
    segment_ids_BxL = jnp.where(kv_mask_BxL, tokens, 0)
  if segment_ids_BxL is not None:
    ids_BxL = segment_ids_BxL.astype(jnp.int32)
    operands += (splash.SegmentIds(q=ids_BxL, kv=ids_BxL),)
    by_example = PartitionSpec(spec[0], None)
    specs += (splash.SegmentIds(q=by_example, kv=by_example),)
  per_example = lambda kernel, *operands: jax.vmap(kernel)(*operands)  # q, k, v[, ids]
  if head_shards * _ways(mesh, spec[0]) == 1:  # nothing split: no mesh, or all replicated
    return per_example(kernel, *operands).swapaxes(1, 2)
  kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(spec[1], None)))
  sharded = jax.shard_map(per_example, mesh=mesh, in_specs=(kernel_spec, *specs),
                          out_specs=spec, check_vma=False)
  return sharded(kernel, *operands).swapaxes(1, 2)


def _kernel(length: int, num_heads: int, head_shards: int, causal: bool, interpret: bool):
  """The kernel for one shape (the library caches the mask walk, ~0.5 s at 8192)."""
  block = math.gcd(length, SPLASH_BLOCK)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  head_mask = (splash.CausalMask if causal else splash.FullMask)((length, length))
  mask = splash.MultiHeadMask([head_mask] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=head_shards,
                                q_seq_shards=1, interpret=interpret)


def _spec(mesh, *names) -> PartitionSpec:
  """The activation spec under the active logical rules, limited to axes `mesh` has."""
  if mesh.empty:
    return PartitionSpec(*(None,) * len(names))
  spec = sharding.logical_spec(linen.get_logical_axis_rules(), *names)
  if any(_ways(mesh, axes) > 1 for axes in spec[2:]):
    raise ValueError('model.attention=splash: the length and kv dims must not be sharded, '
                     f'got {spec}')
  return spec


def _ways(mesh, axes) -> int:
  if mesh.empty or axes is None:
    return 1
  return sharding.shards(mesh.shape, axes)
