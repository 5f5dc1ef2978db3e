"""Learning-rate schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from models import MODELS
from training import optimizer


def _optim(**overrides):
  o = default.get_config().optim
  o.update({'learning_rate': 1.0, 'warmup_steps': 10, 'final_lr_fraction': 0.1, **overrides})
  return o


def test_warmup_is_linear_from_zero():
  schedule = optimizer.learning_rate_schedule(_optim(schedule='constant'), total_steps=100)
  np.testing.assert_allclose([schedule(t) for t in (0, 5, 10, 50)], [0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize('kind, at_60, at_110', [
    ('cosine', 0.1 + 0.9 * 0.5, 0.1),  # halfway through the decay; then the floor
    ('linear', 0.55, 0.1),
    ('constant', 1.0, 1.0),
    ('exponential', 0.5 ** (50 / 100), 0.5),
    ('inverse_time', (1 + 0.1 * 50) ** -0.5, (1 + 0.1 * 100) ** -0.5),
])
def test_decay_after_warmup(kind, at_60, at_110):
  o = _optim(schedule=kind, decay_rate=0.5, decay_steps=100, inverse_time_b=0.1,
             inverse_time_power=0.5)
  schedule = optimizer.learning_rate_schedule(o, total_steps=110)
  np.testing.assert_allclose([schedule(60), schedule(110)], [at_60, at_110], rtol=1e-5)


def test_weight_decay_only_touches_kernels():
  for preset in ('tiny,gpt2', 'tiny,llama'):
    config = default.get_config(preset)
    model = MODELS['transformer'].Model(config.model, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = optimizer.decay_mask(params)
    assert mask['blocks']['layers'][0]['mlp']['up']['kernel'] is True
    assert mask['embed']['embedding'] is False
    assert mask['final_norm']['scale'] is False
    if preset.endswith('gpt2'):
      assert mask['positions'] is False and mask['blocks']['layers'][0]['mlp']['up']['bias'] is False


def test_clipping_and_decay_act_in_the_update():
  o = _optim(schedule='constant', warmup_steps=0, grad_clip_norm=1.0, weight_decay=0.5)
  tx = optimizer.make_optimizer(o, total_steps=10)
  params = {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))}
  grads = {'kernel': jnp.zeros((2,)), 'bias': jnp.zeros((2,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5)  # decoupled decay: -lr * wd * param
  np.testing.assert_allclose(updates['bias'], 0.0)
