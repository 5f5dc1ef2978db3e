"""The train and eval steps: pure functions over the train state, compiled once each.

They name no task and no model: the loss, its auxiliary metrics and the eval sums come from the
task (`setup.task`), batches are dicts whose keys and shardings the task declares.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parallel import sharding
from tasks import base
from training import health, local_sgd, optimizer, precision
from training.state import Setup, TrainState


def _loss_and_grads(setup: Setup, params, model_state, batch, key, config, loss_scale):
  """((loss, (aux, new model state)), grads) of the task's loss on `batch`, plus the
  configured penalties (in the gradient, and in `aux` on their own). `loss_scale` multiplies the
  loss before differentiating and divides the gradients after (None: no scaling)."""
  def loss_fn(p):
    if setup.frozen is not None:  # frozen parameters: zero gradients, their backward skipped
      p = jax.tree.map(lambda w, frozen: jax.lax.stop_gradient(w) if frozen else w, p,
                       setup.frozen)
    model = setup.model(p, model_state)
    loss, aux = setup.task.loss(model, batch, nnx.Rngs(dropout=key))
    penalties = _penalties(config.optim, p)
    total = loss + sum(penalties.values()) if penalties else loss
    scaled = total if loss_scale is None else total * loss_scale
    return scaled, (loss, ({**aux, **penalties}, setup.model_state(model)))
  (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if loss_scale is not None:
    grads = jax.tree.map(lambda g: g / loss_scale, grads)
  return (loss, aux), grads


def _penalties(optim_config, params) -> dict:
  """Coupled L2 (lambda/2 * sum w^2) and L1 (lambda * sum |w|) penalties on the parameters
  weight decay applies to (matmul and conv kernels), each when its weight is non-zero."""
  kernels = [w for w, decays in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(optimizer.decay_mask(params))) if decays]
  penalties = {}
  if optim_config.l2_penalty:
    penalties['l2_penalty'] = optim_config.l2_penalty / 2 * sum(jnp.sum(w**2) for w in kernels)
  if optim_config.l1_penalty:
    penalties['l1_penalty'] = optim_config.l1_penalty * sum(jnp.sum(jnp.abs(w)) for w in kernels)
  return penalties


def _accumulated_loss_and_grads(setup, params, model_state, batch, key, config, loss_scale,
                                num_micro):
  """Averages loss, auxiliary metrics and gradients over `num_micro` micro-batches, one at a
  time (saves memory); model state (e.g. BatchNorm statistics) passes from one to the next.

  Micro-batch i takes rows i, i+num_micro, ... of every batch leaf, so every data shard
  contributes to each one.
  """
  def split(x):
    micro = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(micro, None, 'batch', *([None] * (x.ndim - 1)))

  def add_micro(carry, xs):
    index, micro_batch = xs
    grads_sum, model_state = carry
    (loss, (aux, model_state)), grads = _loss_and_grads(
        setup, params, model_state, micro_batch, jax.random.fold_in(key, index), config,
        loss_scale)
    return (jax.tree.map(jnp.add, grads_sum, grads), model_state), (loss, aux)

  (grads, model_state), (losses, auxes) = jax.lax.scan(
      add_micro, (jax.tree.map(jnp.zeros_like, params), model_state),
      (jnp.arange(num_micro), jax.tree.map(split, batch)))
  mean = lambda x: x.mean(axis=0)
  return ((mean(losses), (jax.tree.map(mean, auxes), model_state)),
          jax.tree.map(lambda g: g / num_micro, grads))


def learning_rate(opt_state):
  """The learning rate the optimiser used for its last update (`optax.inject_hyperparams`),
  times reduce_on_plateau's multiplier if there is one."""
  # The value, not the schedule's own state, which `inject_hyperparams` keeps under that name.
  rate = optax.tree.get(opt_state, 'learning_rate', filtering=lambda _, v: not isinstance(v, tuple))
  multiplier = optax.tree.get(opt_state, 'lr_multiplier')
  return rate if multiplier is None else rate * multiplier


def train_step(state: TrainState, batch, *, setup: Setup, config):
  """One optimiser update on a global batch; returns the new state and scalar metrics."""
  params, model_state = state['params'], state.get('model_state')
  key = jax.random.fold_in(jax.random.key(config.seed), state['step'])  # dropout and the like
  if 'replica' in state:  # a local-SGD replica (training/local_sgd.py): a stream of its own
    key = jax.random.fold_in(key, state['replica'])
  num_micro = config.train.grad_accum_steps
  scaling = 'loss_scale' in state
  loss_scale = state['loss_scale']['scale'] if scaling else None
  if num_micro == 1:
    (loss, (aux, new_model_state)), grads = _loss_and_grads(setup, params, model_state, batch,
                                                            key, config, loss_scale)
  else:
    (loss, (aux, new_model_state)), grads = _accumulated_loss_and_grads(
        setup, params, model_state, batch, key, config, loss_scale, num_micro)
  if config.train.debug_nan_at_step:  # fault injection, for testing the policies below
    poison = jnp.where(state['step'] + 1 == config.train.debug_nan_at_step, jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  grad_norm = optax.tree.norm(grads)
  # A loss-scale overflow is expected now and then: the scale handles it, not the guard. At
  # the smallest scale (1) non-finite gradients are a real fault again.
  overflow = (~jnp.isfinite(grad_norm) & jnp.isfinite(loss) & (loss_scale > 1) if scaling
              else jnp.zeros((), bool))
  verdict = _guard(config.train, state['loss_stats'], loss, jnp.where(overflow, 0.0, grad_norm))
  # Per-layer norms for gradient health (training/health.py); with health off, none at all.
  layers = health.layers(setup.param_template) if config.health.every else ()

  def update(kept):
    updates, opt_state = setup.tx.update(grads, kept['opt_state'], kept['params'])
    new = {'params': optax.apply_updates(kept['params'], updates), 'opt_state': opt_state,
           'loss_stats': _update_loss_stats(config.train, kept['loss_stats'], loss)}
    if new_model_state is not None:
      new['model_state'] = new_model_state
    # The updates' norms here, while they exist: not as new - old params, which would keep the
    # donated old params alive next to the new ones.
    return new, health.layer_norms(updates, layers) if layers else None

  def reject(kept):
    return kept, jnp.zeros(len(layers)) if layers else None

  # A rejected update leaves parameters, model and optimizer state and loss statistics exactly
  # as they were. A conditional runs only the taken branch; a select over the whole state made
  # XLA copy every optimizer leaf first and held ~25 MiB more while compiling.
  kept = {k: state[k] for k in ('params', 'model_state', 'opt_state', 'loss_stats')
          if k in state}
  new_state, update_norms = jax.lax.cond(verdict['accept'] & ~overflow, update, reject, kept)
  new_state['step'] = state['step'] + 1
  new_state['skipped_steps'] = state['skipped_steps'] + 1 - verdict['accept'].astype(jnp.int32)
  if scaling:
    new_state['loss_scale'] = precision.next_state(config.train, state['loss_scale'],
                                                   jnp.isfinite(grad_norm))
  metrics = {'learning_rate': learning_rate(new_state['opt_state']), 'train/loss': loss,
             **{f'train/{k}': v for k, v in aux.items()},
             'train/grad_norm': grad_norm, 'train/param_norm': optax.tree.norm(params),
             'train/skipped_steps': new_state['skipped_steps'],
             **{f'guard/{k}': v.astype(jnp.float32) for k, v in verdict.items()}}
  if scaling:  # the scale this step used, and the steps skipped for overflow so far
    metrics.update({'train/loss_scale': loss_scale,
                    'train/loss_scale_overflows': new_state['loss_scale']['overflows']})
  if layers:  # one array, one transfer: [grad, param, applied update] norms x layers
    metrics['health/norms'] = jnp.stack([health.layer_norms(grads, layers),
                                         health.layer_norms(params, layers), update_norms])
  return new_state, metrics


def _guard(train_config, stats, loss, grad_norm):
  """Accept the update only with a finite loss and gradients and, if enabled, no loss spike."""
  nonfinite_loss, nonfinite_grads = ~jnp.isfinite(loss), ~jnp.isfinite(grad_norm)
  spike = jnp.zeros((), bool)
  if train_config.spike_sigmas > 0:
    threshold = stats['mean'] + train_config.spike_sigmas * jnp.sqrt(stats['var'])
    spike = (stats['count'] >= train_config.spike_window) & (loss > threshold)
  return {'accept': ~(nonfinite_loss | nonfinite_grads | spike), 'nonfinite_loss': nonfinite_loss,
          'nonfinite_grads': nonfinite_grads, 'loss_spike': spike}


def _update_loss_stats(train_config, stats, loss):
  """Exponential moving mean and variance of the loss over about `spike_window` steps."""
  decay = 1.0 - 1.0 / train_config.spike_window
  delta = loss - stats['mean']
  mean = stats['mean'] + (1 - decay) * delta
  var = decay * (stats['var'] + (1 - decay) * delta ** 2)
  return {'mean': mean, 'var': var, 'count': stats['count'] + 1}


def eval_step(params, model_state, batch, *, setup: Setup):
  """The task's eval sums over one global batch (padding rows count zero)."""
  return setup.task.eval_sums(setup.model(params, model_state), batch)


def compile_steps(setup: Setup, config, mesh):
  """jit-compiled (train_step, eval_step) with explicit shardings; the state is donated.

  train_step(state, batch) -> (state, metrics); eval_step(params, model_state, batch) -> sums.
  """
  rules, replicated = config.mesh.rules, sharding.replicated(mesh)
  step = train_step if setup.outer_tx is None else functools.partial(local_sgd.train_step,
                                                                     step_fn=train_step)
  train = jax.jit(functools.partial(step, setup=setup, config=config),
                  in_shardings=(setup.shardings,
                                base.batch_shardings(setup.task.batch_spec('train'), mesh, rules)),
                  out_shardings=(setup.shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, setup=setup),
                     in_shardings=(setup.shardings['params'], setup.shardings.get('model_state'),
                                   base.batch_shardings(setup.task.batch_spec('eval'), mesh,
                                                        rules)),
                     out_shardings=replicated)
  return train, evaluate
