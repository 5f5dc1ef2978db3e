"""Optimisers and clipping chosen by name: each checked against Optax (or a hand computation)
applied directly, under FSDP and through a resume, and the config errors. Schedules are in
tests/test_schedules.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import default, fashion_mnist_cnn
from models import MODELS
from tests import test_sharding
from tests.test_faults import _assert_same_state
from tests.test_train_e2e import REPO, run_train
from parallel import sharding
from training import config_check, optimizer
from training import state as state_lib
from training import step as step_lib
from training.step import learning_rate

PARAMS = {'dense': {'kernel': jnp.arange(12.0).reshape(4, 3) / 10 - 0.5,
                    'bias': jnp.array([0.1, -0.2, 0.3])},
          'embed': {'embedding': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}}
DECAYED = {'dense': {'kernel': True, 'bias': False}, 'embed': {'embedding': False}}
MUON_DIMS = {'dense': {'kernel': optax.contrib.MuonDimensionNumbers(), 'bias': None},
             'embed': {'embedding': None}}


def _grads(step):
  """Gradients small enough that the default global-norm clip (1.0) never acts."""
  key = jax.random.fold_in(jax.random.key(0), step)
  return jax.tree.map(lambda p: 0.05 * jax.random.normal(key, p.shape), PARAMS)


def _optim(**overrides):
  o = default.get_config().optim
  o.update({'learning_rate': 0.01, 'warmup_steps': 2, **overrides})
  return o


def _train(tx, steps):
  params, state, update = PARAMS, tx.init(PARAMS), jax.jit(tx.update)
  for step in range(steps):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# Each optimiser as Optax builds it, with the keys set here (non-default where it matters).
SECTIONS = {
    'sgd': dict(momentum=0.5, nesterov=True),
    'adam': dict(b2=0.99),
    'adamw': dict(weight_decay=0.3),
    'adagrad': dict(initial_accumulator_value=0.2),
    'adadelta': dict(rho=0.8, weight_decay=0.3),
    'adamax': dict(b1=0.8),
    'rmsprop': dict(centered=True, momentum=0.5),
    'lion': dict(weight_decay=0.3),
    'adafactor': dict(min_dim_size_to_factor=2, weight_decay=0.3),
    'lamb': dict(weight_decay=0.3),
    'muon': dict(weight_decay=0.3, ns_steps=4),
}
BY_HAND = {
    'sgd': lambda lr: optax.sgd(lr, momentum=0.5, nesterov=True),
    'adam': lambda lr: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-8),
    'adamw': lambda lr: optax.adamw(lr, 0.9, 0.95, 1e-8, weight_decay=0.3, mask=DECAYED),
    'adagrad': lambda lr: optax.adagrad(lr, initial_accumulator_value=0.2, eps=1e-7),
    'adadelta': lambda lr: optax.adadelta(lr, rho=0.8, eps=1e-6, weight_decay=0.3,
                                          weight_decay_mask=DECAYED),
    'adamax': lambda lr: optax.adamax(lr, b1=0.8, b2=0.999, eps=1e-8),
    'rmsprop': lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-8, centered=True, momentum=0.5),
    'lion': lambda lr: optax.lion(lr, b1=0.9, b2=0.99, weight_decay=0.3, mask=DECAYED),
    'adafactor': lambda lr: optax.adafactor(lr, min_dim_size_to_factor=2, weight_decay_rate=0.3,
                                            weight_decay_mask=DECAYED),
    'lamb': lambda lr: optax.lamb(lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.3,
                                  mask=DECAYED),
    'muon': lambda lr: optax.contrib.muon(lr, ns_steps=4, weight_decay=0.3,
                                          weight_decay_mask=DECAYED,
                                          muon_weight_dimension_numbers=MUON_DIMS),
}


def test_every_optimizer_is_tested():
  assert set(BY_HAND) - {'muon'} == set(optimizer.OPTIMIZERS) - {'muon'}


@pytest.mark.parametrize('name', sorted(BY_HAND))
def test_optimizer_matches_optax_applied_by_hand(name):
  if name not in optimizer.OPTIMIZERS:
    pytest.skip('this optax has no contrib.muon')
  o = _optim(name=name)
  o[name].update(SECTIONS[name])
  # The default schedule: linear warmup over 2 steps to 0.01, then cosine to 0.001 at step 10.
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, 2, 10, end_value=0.001)
  ours, state = _train(optimizer.make_optimizer(o, total_steps=10), steps=4)
  theirs, _ = _train(optax.chain(optax.clip_by_global_norm(1.0), BY_HAND[name](schedule)), 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
  assert not np.allclose(ours['dense']['kernel'], PARAMS['dense']['kernel'])
  np.testing.assert_allclose(learning_rate(state), schedule(3), rtol=1e-6)


def _update(grad_clip, grads, params, **keys):
  """The first update of plain SGD at rate 1: minus the clipped gradient."""
  o = _optim(name='sgd', schedule='constant', warmup_steps=0, learning_rate=1.0,
             grad_clip=grad_clip, **keys)
  o.sgd.momentum = 0.0
  tx = optimizer.make_optimizer(o, total_steps=10)
  return tx.update(grads, tx.init(params), params)[0]


def test_global_norm_clipping_rescales_a_large_gradient():
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}  # global norm 5
  updates = _update('global_norm', grads, grads, grad_clip_norm=2.0)
  np.testing.assert_allclose(updates['a'], [-1.2, 0.0], rtol=1e-6)  # 2/5 of each
  np.testing.assert_allclose(updates['b'], [-1.6], rtol=1e-6)


def test_value_clipping_clips_each_element():
  grads = {'a': jnp.array([3.0, -0.5, -4.0])}
  updates = _update('value', grads, grads, grad_clip_value=1.0)
  np.testing.assert_allclose(updates['a'], [-1.0, 0.5, 1.0])


def test_adaptive_clipping_bounds_each_unit_relative_to_its_weights():
  # Units are the kernel's output columns: weight norms 5 and 1, gradient norms 10 and 0.05.
  params = {'kernel': jnp.array([[3.0, 0.0], [4.0, 1.0]])}
  grads = {'kernel': jnp.array([[6.0, 0.0], [8.0, 0.05]])}
  updates = _update('adaptive', grads, params, grad_clip_factor=0.1)
  # Column 0 may have norm 0.1 * 5 = 0.5: scaled by 0.5/10. Column 1 is within 0.1 * 1.
  np.testing.assert_allclose(updates['kernel'], [[-0.3, 0.0], [-0.4, -0.05]], rtol=1e-5)


def test_no_clipping_passes_a_large_gradient_through():
  grads = {'a': jnp.array([30.0, -40.0])}
  np.testing.assert_allclose(_update('none', grads, grads)['a'], [-30.0, 40.0])


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
      assert mask['positions'] is False
      assert mask['blocks']['layers'][0]['mlp']['up']['bias'] is False


def _steps_through_a_checkpoint(config, directory):
  """FSDP over every device, STEPS steps, and the same run saved with Orbax after its first step
  and restored into the abstract state (as train.py restores): (losses, final state) of each."""
  config.mesh.update(test_sharding.LAYOUTS['fsdp8'])
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  setup = state_lib.make_setup(config, mesh)
  batches = test_sharding._batches(config)
  with sharding.activate(mesh, config.mesh.rules):
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    state, metrics_ = train_step(state_lib.init_state(config, setup), batches[0])
    losses = [float(metrics_['train/loss'])]
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory, state)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(directory, setup.abstract_state)
    _assert_same_state(jax.device_get(restored), jax.device_get(state))
    runs = []
    for state in (state, restored):
      run_losses = list(losses)
      for batch in batches[1:]:
        state, metrics_ = train_step(state, batch)
        run_losses.append(float(metrics_['train/loss']))
      runs.append((run_losses, jax.device_get(state)))
  return runs


@pytest.mark.parametrize('name', sorted(SECTIONS))
def test_every_optimizer_under_fsdp_matches_one_device_and_resumes_bit_for_bit(name, tmp_path):
  """State sharded like its parameter (Muon orthogonalises whole matrices that FSDP splits, and
  keeps state for some parameters only; LAMB's trust ratios span whole parameters; Adafactor
  factors its second moments) gives one device's run, and survives a save and restore."""
  if name not in optimizer.OPTIMIZERS:
    pytest.skip('this optax has no contrib.muon')

  def config():  # Llama style: GPT-2's key bias has a gradient of zero but for rounding, which
    c = default.get_config('tiny,llama')  # Lion and Adafactor scale up to whole updates
    c.optim.name = name
    c.optim[name].update(SECTIONS[name])
    return c
  reference = test_sharding._run(config(), dict(data=1, fsdp=1, tensor=1), jax.devices()[:1],
                                 test_sharding._batches(config()))
  unbroken, resumed = _steps_through_a_checkpoint(config(), tmp_path / 'checkpoint')
  test_sharding._assert_same_run(unbroken, reference)
  assert resumed[0] == unbroken[0]
  _assert_same_state(resumed[1], unbroken[1])


# --- config errors -------------------------------------------------------------------------------

CNN = '--config=' + os.path.join(REPO, 'configs', 'fashion_mnist_cnn.py') + ':tiny'
ERRORS = {
    'unknown optimiser': (['--config.optim.name=adamq'], "optim.name: 'adamq' is not one of"),
    'unknown schedule': (['--config.optim.schedule=sine'], "optim.schedule: 'sine' is not one of"),
    'key of another optimiser': (['--config.optim.sgd.momentum=0.5'],
                                 "optim.sgd.momentum: set to 0.5, but optim.name='adamw' does not"),
    'negative learning rate': (['--config.optim.learning_rate=-0.1'], 'optim.learning_rate'),
}


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_bad_optim_config_exits_2_with_one_line(tmp_path, case):
  args, expected = ERRORS[case]
  result = run_train(tmp_path / 'run', *args)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('train.py: error:')]
  assert len(errors) == 1 and expected in errors[0], result.stderr
  assert not os.path.exists(tmp_path / 'run')


def _check(config, overridden=()):
  config_check.check_optim(config, set(overridden))


def test_switching_optimizer_leaves_the_files_own_tuning_behind():
  config = fashion_mnist_cnn.get_config()  # tunes optim.adamw.b2 and its weight decay
  config.optim.name = 'sgd'
  _check(config, ['optim.name'])  # switched on the command line: fine
  with pytest.raises(config_check.ConfigError, match='optim.adamw.b2: set to 0.999'):
    _check(config)  # a file that chose sgd but set AdamW's keys
  with pytest.raises(config_check.ConfigError, match='optim.adamw.b2'):
    _check(config, ['optim.name', 'optim.adamw.b2'])  # set on the command line: never


@pytest.mark.parametrize('key, value, error', [
    ('decay_rate', 0.9, "optim.decay_rate: set to 0.9, but optim.schedule='cosine'"),
    ('grad_clip_value', 0.5, 'optim.grad_clip_value: set to 0.5, but optim.grad_clip='),
    ('schedule', 'step', None),  # step's own keys at their defaults: fine
])
def test_keys_of_another_schedule_or_clip(key, value, error):
  config = default.get_config()
  config.optim[key] = value
  if error is None:
    _check(config)
  else:
    with pytest.raises(config_check.ConfigError, match=error.replace('(', r'\(')):
      _check(config)


@pytest.mark.parametrize('key, value, error', [
    ('adamw.weight_decay', -0.1, 'optim.adamw.weight_decay: must be >= 0'),
    ('adamw.b2', 1.0, r'optim.adamw.b2: must be in \[0, 1\)'),
    ('plateau.factor', 1.5, r'optim.plateau.factor: must be in \(0, 1\)'),
    ('step_factors', (0.1,), 'optim.step_factors: 1 factors for 2 boundaries'),
])
def test_bad_values_name_the_key(key, value, error):
  config = default.get_config()
  config.optim.schedule = 'reduce_on_plateau' if key.startswith('plateau') else 'step'
  section, _, leaf = key.rpartition('.')
  (config.optim[section] if section else config.optim)[leaf] = value
  with pytest.raises(config_check.ConfigError, match=error):
    _check(config)
