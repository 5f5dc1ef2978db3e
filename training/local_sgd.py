"""Local SGD / DiLoCo: replicas that train on their own and meet every `train.sync_every` steps.

With `train.sync_every=H > 1` the mesh's `data` axis holds the replicas: on a multi-slice job
with `mesh.data=1` one replica per slice (`mesh.dcn_data`), on one host `mesh.data=N` simulates N.
Each replica keeps its own parameters and inner optimiser state (`state['local']`: the train
state of one replica with a leading replica axis sharded over `data`) and takes ordinary train
steps on its share of each batch, its gradient reductions staying inside the replica (`fsdp`,
`tensor`). Every H steps the replicas' deltas from the global parameters (the outer gradient) are
averaged, the only traffic between replicas, and applied to the global parameters
(`state['params']`) by the outer optimiser, Nesterov SGD (`optim.outer`, `state['opt_state']`);
every replica restarts from the result (Douillard et al. 2023, "DiLoCo"). Evaluation, early
stopping, EMA and samples read the global parameters.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen
from jax.sharding import NamedSharding, PartitionSpec

REPLICA_AXIS = 'data'  # the mesh axis whose groups are the replicas


def outer_optimizer(outer_config) -> optax.GradientTransformation:
  o = outer_config
  return optax.sgd(o.learning_rate, momentum=o.momentum or None, nesterov=o.nesterov)


def _without_replica_axis(axes):
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  kept = tuple(a for a in axes if a != REPLICA_AXIS)
  return kept or None


def inner_rules(rules) -> tuple:
  """The rule table inside one replica: the replica axis is taken by the replicas themselves."""
  return tuple((name, _without_replica_axis(axes)) for name, axes in rules)


def layout(abstract, shardings, outer_tx, opt_state_shardings, mesh):
  """(abstract state, shardings) of a local-SGD run from those of one replica's train state.
  `opt_state_shardings(tx, abstract opt state)` shards an optimiser state like its parameters."""
  replicas = mesh.shape[REPLICA_AXIS]
  stacked = lambda s: NamedSharding(mesh, PartitionSpec(REPLICA_AXIS, *s.spec))
  local_abstract = {**jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((replicas, *a.shape), a.dtype), abstract),
                    'replica': jax.ShapeDtypeStruct((replicas,), jnp.int32)}
  outer_abstract = jax.eval_shape(outer_tx.init, abstract['params'])
  new_abstract = {**_global(abstract), 'opt_state': outer_abstract, 'local': local_abstract}
  new_shardings = {**_global(shardings),
                   'opt_state': opt_state_shardings(outer_tx, outer_abstract),
                   'local': {**jax.tree.map(stacked, shardings),
                             'replica': NamedSharding(mesh, PartitionSpec(REPLICA_AXIS))}}
  return new_abstract, new_shardings


def _global(state) -> dict:
  return {k: state[k] for k in ('step', 'params', 'skipped_steps')}


def initial_state(inner_state, outer_tx, replicas: int) -> dict:
  """Every replica starts from the global parameters, with its own copy of the inner state
  and its index (`replica`: its own random stream, e.g. for dropout)."""
  local = {**jax.tree.map(lambda x: jnp.broadcast_to(x, (replicas, *x.shape)), inner_state),
           'replica': jnp.arange(replicas, dtype=jnp.int32)}
  return {**_global(inner_state), 'opt_state': outer_tx.init(inner_state['params']),
          'local': local}


def inner_step(state, batch, *, step_fn, config):
  """`step_fn` (one replica's train step) on every replica at once, each on its rows of the
  batch; returns the new state and the metrics averaged over the replicas."""
  replicas = jax.tree.leaves(state['local'])[0].shape[0]
  split = lambda x: x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:])
  with linen.logical_axis_rules(inner_rules(config.mesh.rules)):
    local, metrics = jax.vmap(step_fn, spmd_axis_name=REPLICA_AXIS)(
        state['local'], jax.tree.map(split, batch))
  local['replica'] = state['local']['replica']  # the step keeps only what it updates
  new_state = {**state, 'local': local, 'step': state['step'] + 1,
               'skipped_steps': local['skipped_steps'].sum()}
  return new_state, {k: _across_replicas(k, v) for k, v in metrics.items()}


def _across_replicas(key, value):
  """A guard flag is raised if any replica raised it; counts add up; the rest is averaged."""
  if key == 'train/skipped_steps':
    return value.sum(0)
  if key == 'guard/accept':
    return value.min(0)
  if key.startswith('guard/'):
    return value.max(0)
  return value.mean(0)


def sync(params, outer_opt_state, local_params, *, outer_tx):
  """The outer step: (global params, outer state, every replica's params) after averaging the
  replicas' deltas and applying them with the outer optimiser; every replica restarts there."""
  outer_grads = jax.tree.map(lambda g, l: g - l.mean(0), params, local_params)
  updates, outer_opt_state = outer_tx.update(outer_grads, outer_opt_state, params)
  params = optax.apply_updates(params, updates)
  local_params = jax.tree.map(lambda g, l: jnp.broadcast_to(g, l.shape), params, local_params)
  return params, outer_opt_state, local_params


def train_step(state, batch, *, step_fn, setup, config):
  """One inner step on every replica, then the outer step when it is due (every sync_every)."""
  state, metrics = inner_step(
      state, batch, step_fn=functools.partial(step_fn, setup=setup, config=config),
      config=config)
  due = state['step'] % config.train.sync_every == 0
  outer = (state['params'], state['opt_state'], state['local']['params'])
  params, opt_state, local_params = jax.lax.cond(
      due, functools.partial(sync, outer_tx=setup.outer_tx), lambda *a: a, *outer)
  return {**state, 'params': params, 'opt_state': opt_state,
          'local': {**state['local'], 'params': local_params}}, metrics
