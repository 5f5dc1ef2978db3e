"""Pipeline parallelism: a layer stack split into stages over the mesh's `stage` axis (GPipe).

The stack's parameters are reshaped [stages, layers per stage, ...], their stage dimension
sharded over `stage`, so stage s holds (and updates) only its own layers. The batch is split
into micro-batches that enter the first stage one per tick; every tick each stage runs its
layers on what it holds (one `vmap` over the stage dimension: all stages at once, each on its
devices) and passes the result one stage on (`jnp.roll` along the stage-sharded dimension,
which XLA compiles to a collective-permute). After `microbatches + stages - 1` ticks the last
stage has put out every micro-batch. Ticks where a stage holds no micro-batch yet (or no more)
are the bubble: a share (stages - 1) / (microbatches + stages - 1) of each stage's time.

Data, FSDP and tensor parallelism apply within each stage as usual (the `batch` of a
micro-batch stays on `data`/`fsdp`), and the backward pass is the same schedule reversed, which
autodiff derives from the forward. FSDP-sharded stage weights are gathered inside the tick, so
once per tick rather than once per step.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from parallel.sharding import constrain


def num_stages() -> int:
  """The `stage` axis size of the mesh being traced under; 1 outside a mesh."""
  return dict(jax.sharding.get_abstract_mesh().shape).get('stage', 1)


def bubble_fraction(stages: int, microbatches: int) -> float:
  """The share of each stage's ticks that GPipe leaves idle."""
  return (stages - 1) / (microbatches + stages - 1)


def by_stage(tree, stages: int):
  """Leaves [N, ...] -> [stages, N / stages, ...], the stage dimension on the `stage` axis."""
  def split(a):
    a = a.reshape(stages, a.shape[0] // stages, *a.shape[1:])
    return jax.lax.with_sharding_constraint(
        a, PartitionSpec('stage', *[PartitionSpec.UNCONSTRAINED] * (a.ndim - 1)))
  return jax.tree.map(split, tree)


def _micro(a, microbatches: int):
  """[B, ...] -> [microbatches, B / microbatches, ...]: micro-batch i takes rows i, i + M, ...
  so each data shard's rows stay on it (it holds B / shards rows, a multiple of M)."""
  a = a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]).swapaxes(0, 1)
  return constrain(a, None, 'batch', *[None] * (a.ndim - 2))


def _unmicro(a):
  return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])


def gpipe(stage_fn, stage_args, x_BxLxD, rows, microbatches: int):
  """Runs `stage_fn` stage after stage on `x_BxLxD` in `microbatches` micro-batches.

  `stage_fn(args, x_bxLxD, rows_b, micro)` applies one stage: `args` is that stage's slice of
  `stage_args` (leaves [stages, ...], from `by_stage`), `rows_b` its micro-batch of `rows` (a
  pytree of per-example arrays [B, ...] such as document ids, or None leaves) and `micro` the
  micro-batch's index (for dropout keys). Returns the last stage's output [B, L, D].
  """
  stages = jax.tree.leaves(stage_args)[0].shape[0]
  ticks = microbatches + stages - 1
  inputs = jax.tree.map(lambda a: _micro(a, microbatches), (x_BxLxD, rows))
  stage_index = jnp.arange(stages)
  held = lambda a: constrain(a, 'stage', 'batch', *[None] * (a.ndim - 2))
  run_stages = jax.vmap(stage_fn, spmd_axis_name='stage')

  def tick(carry, t):
    state, outputs = carry
    # Stage 0 takes micro-batch t (after the last one, a repeat whose result is dropped);
    # stage s > 0 what stage s - 1 put out last tick.
    fresh = jax.tree.map(lambda a: a[jnp.minimum(t, microbatches - 1)], inputs)
    state = jax.tree.map(
        lambda new, old: held(jnp.where(
            (stage_index == 0).reshape(-1, *[1] * (old.ndim - 1)), new[None],
            jnp.roll(old, 1, axis=0))), fresh, state)
    x, rows_S = state
    x = held(run_stages(stage_args, x, rows_S, t - stage_index))
    # The last stage finished micro-batch t - (stages - 1); earlier ticks write slot 0, which
    # the real one overwrites.
    done = jnp.maximum(t - (stages - 1), 0)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, x[-1], done, 0)
    return ((x, rows_S), outputs), None

  state = jax.tree.map(lambda a: held(jnp.zeros((stages, *a.shape[1:]), a.dtype)), inputs)
  outputs = jnp.zeros_like(inputs[0])
  (_, outputs), _ = jax.lax.scan(tick, (state, outputs), jnp.arange(ticks))
  return constrain(_unmicro(outputs), 'batch', 'length', 'embed')
