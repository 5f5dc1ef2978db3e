"""The train and eval steps: pure functions over the train state, compiled once each.

The task (next-token cross-entropy) lives in `next_token_loss`, apart from the update logic, so
other tasks can swap it.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parallel import sharding
from training import optimizer
from training.state import Setup, TrainState


def next_token_loss(model, tokens_BxL1, dropout_key=None):
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1].

  With `model.loss_chunk` > 0 the logits exist only `loss_chunk` positions at a time.
  """
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  chunk = model.cfg.loss_chunk
  if not chunk:
    logits_BxLxV = model(inputs_BxL, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()
  return _chunked_loss(model, model.hidden(inputs_BxL, rngs=rngs), targets_BxL, chunk)


def _chunked_loss(model, x_BxLxD, targets_BxL, chunk):
  """Mean cross-entropy over chunks of `chunk` positions, scanned: each chunk's [B, C, V]
  logits are made, reduced to a sum and dropped, then remade in the backward pass."""
  b, l, d = x_BxLxD.shape
  x_NxBxCxD = x_BxLxD.reshape(b, l // chunk, chunk, d).swapaxes(0, 1)
  x_NxBxCxD = sharding.constrain(x_NxBxCxD, None, 'batch', 'length', 'embed')
  targets_NxBxC = targets_BxL.reshape(b, l // chunk, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sum(x_BxCxD, targets_BxC):
    logits_BxCxV = model.logits(x_BxCxD)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV, targets_BxC).sum()

  def add_chunk(total, xs):
    return total + chunk_sum(*xs), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), (x_NxBxCxD, targets_NxBxC))
  return total / (b * l)


def _loss_and_grads(setup: Setup, params, tokens_BxL1, dropout_key):
  loss_fn = lambda p: next_token_loss(setup.model(p), tokens_BxL1, dropout_key)
  return jax.value_and_grad(loss_fn)(params)


def _accumulated_loss_and_grads(setup, params, tokens_BxL1, dropout_key, num_micro):
  """Averages loss and gradients over `num_micro` micro-batches, one at a time (saves memory).

  Micro-batch i takes rows i, i+num_micro, ... so every data shard contributes to each one.
  """
  b, l1 = tokens_BxL1.shape
  micro_MxBxL1 = tokens_BxL1.reshape(b // num_micro, num_micro, l1).swapaxes(0, 1)
  micro_MxBxL1 = sharding.constrain(micro_MxBxL1, None, 'batch', 'length')

  def add_micro(carry, xs):
    index, tokens = xs
    loss, grads = _loss_and_grads(setup, params, tokens, _fold(dropout_key, index))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(add_micro, zeros, (jnp.arange(num_micro), micro_MxBxL1))
  return jax.tree.map(lambda x: x / num_micro, (loss, grads))


def _fold(key, data):
  return None if key is None else jax.random.fold_in(key, data)


def train_step(state: TrainState, tokens_BxL1, *, setup: Setup, config):
  """One optimiser update on a global batch; returns the new state and scalar metrics."""
  params = state['params']
  dropout_key = None
  if config.model.dropout_rate > 0:
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), state['step'])
  num_micro = config.train.grad_accum_steps
  if num_micro == 1:
    loss, grads = _loss_and_grads(setup, params, tokens_BxL1, dropout_key)
  else:
    loss, grads = _accumulated_loss_and_grads(setup, params, tokens_BxL1, dropout_key,
                                              num_micro)
  if config.train.debug_nan_at_step:  # fault injection, for testing the policies below
    poison = jnp.where(state['step'] + 1 == config.train.debug_nan_at_step, jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  grad_norm = optax.tree.norm(grads)
  verdict = _guard(config.train, state['loss_stats'], loss, grad_norm)

  def update(kept):
    updates, opt_state = setup.tx.update(grads, kept['opt_state'], kept['params'])
    return {'params': optax.apply_updates(kept['params'], updates), 'opt_state': opt_state,
            'loss_stats': _update_loss_stats(config.train, kept['loss_stats'], loss)}

  # A rejected update leaves parameters, optimizer and loss statistics exactly as they were. A
  # conditional runs only the taken branch; a select over the whole state made XLA copy every
  # optimizer leaf first and held ~25 MiB more while compiling (same step time on CPU).
  kept = {k: state[k] for k in ('params', 'opt_state', 'loss_stats')}
  new_state = jax.lax.cond(verdict['accept'], update, lambda kept: kept, kept)
  new_state['step'] = state['step'] + 1
  new_state['skipped_steps'] = state['skipped_steps'] + 1 - verdict['accept'].astype(jnp.int32)
  schedule = optimizer.learning_rate_schedule(config.optim, config.train.steps)
  metrics = {'learning_rate': schedule(state['step']), 'train/loss': loss,
             'train/grad_norm': grad_norm, 'train/param_norm': optax.tree.norm(params),
             'train/skipped_steps': new_state['skipped_steps'],
             **{f'guard/{k}': v.astype(jnp.float32) for k, v in verdict.items()}}
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


def eval_step(params, tokens_BxL1, *, setup: Setup):
  return next_token_loss(setup.model(params), tokens_BxL1)


def compile_steps(setup: Setup, config, mesh):
  """jit-compiled (train_step, eval_step) with explicit shardings; the state is donated."""
  batch = sharding.logical_sharding(mesh, config.mesh.rules, 'batch', 'length')
  replicated = sharding.replicated(mesh)
  train = jax.jit(functools.partial(train_step, setup=setup, config=config),
                  in_shardings=(setup.shardings, batch),
                  out_shardings=(setup.shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, setup=setup),
                     in_shardings=(setup.shardings['params'], batch), out_shardings=replicated)
  return train, evaluate
