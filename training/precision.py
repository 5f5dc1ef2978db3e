"""Dynamic loss scaling, for float16 compute (`model.dtype='float16'`, e.g. on GPUs).

float16 gradients underflow to zero below about 6e-8, so the loss is multiplied by a scale
before the backward pass and the gradients divided by it after (Micikevicius et al., "Mixed
Precision Training", 2018). Too large a scale overflows instead: a step whose gradients are not
finite is skipped and the scale halved; after `train.loss_scale_period` finite steps in a row it
doubles. The scale lives in the train state, so it is checkpointed and restored with it.

Precision policies are set by three keys: `model.dtype` (activations: float32, bfloat16 or
float16; 'auto' is bfloat16 on TPU/GPU and float32 on CPU), `model.param_dtype` (parameters and
optimizer state, float32 by default) and `train.loss_scale`, whose modes are registered here:
each builds whether the run scales its loss.
"""

import jax.numpy as jnp

from data.choices import Key, Registry, require

LOSS_SCALE = Registry('train.loss_scale', 'loss scaling, for float16 compute')
MAX_SCALE = 2.0**24  # far above what float16 gradients need; keeps the scale itself finite
_SCALING = dict(loss_scale_init=Key(2.0**15, 'the first scale'), loss_scale_period=Key(
    2000, 'finite steps in a row before the scale doubles'))


def _check_scaling(t, **_):
  require(t.loss_scale_init >= 1, 'loss_scale_init', f'must be >= 1, got {t.loss_scale_init}')
  require(t.loss_scale_period > 0, 'loss_scale_period',
          f'must be positive, got {t.loss_scale_period}')


@LOSS_SCALE.register('auto', 'dynamic with model.dtype=float16, else none', _check_scaling,
                     **_SCALING)
def _auto(config) -> bool:
  return config.model.get('dtype') == 'float16'


@LOSS_SCALE.register('dynamic', 'dynamic, whatever model.dtype', _check_scaling, **_SCALING)
def _dynamic(config) -> bool:
  del config
  return True


@LOSS_SCALE.register('none', 'never scaled')
def _none(config) -> bool:
  del config
  return False


def enabled(config) -> bool:
  return LOSS_SCALE[config.train.loss_scale].build(config)


def initial_state(train_config) -> dict:
  return {'scale': jnp.asarray(train_config.loss_scale_init, jnp.float32),
          'good_steps': jnp.zeros((), jnp.int32),  # finite steps since the last change
          'overflows': jnp.zeros((), jnp.int32)}  # steps skipped for non-finite gradients


def next_state(train_config, state: dict, grads_finite) -> dict:
  """Halves the scale (never below 1) after non-finite gradients; doubles it after
  `loss_scale_period` finite steps in a row."""
  good_steps = jnp.where(grads_finite, state['good_steps'] + 1, 0)
  grow = good_steps >= train_config.loss_scale_period
  scale = jnp.where(grads_finite,
                    jnp.where(grow, jnp.minimum(state['scale'] * 2, MAX_SCALE), state['scale']),
                    jnp.maximum(state['scale'] / 2, 1.0))
  return {'scale': scale, 'good_steps': jnp.where(grow, 0, good_steps),
          'overflows': state['overflows'] + (~grads_finite).astype(jnp.int32)}
