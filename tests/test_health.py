"""Gradient health per layer: the norms against jax.grad, the detector on made-to-fail models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from parallel import sharding
from tasks import language_model
from tests.test_train_e2e import run_train
from training import config_check, health, metrics
from training import state as state_lib
from training import step as step_lib


def _health(**overrides):
  return ml_collections.ConfigDict({**health.default_config().to_dict(), **overrides})


def _setup_and_batch(config):
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  rows, length = config.data.global_batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, 256, (rows, length + 1), np.int32)
  return mesh, setup, language_model.one_document_per_row(tokens)


def _step(config, mesh, setup, batch):
  with sharding.activate(mesh, config.mesh.rules):
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    state = state_lib.init_state(config, setup)
    params = jax.device_get(state['params'])  # the state is donated to the step
    return params, *jax.device_get(train_step(state, batch))


def _hand_norm(tree, name, scanned):
  """A layer's norm picked out of a params-shaped tree by hand: for `a/b/3/c` the leaves under
  a/b/3/c, or, scanned, slice 3 of the leaves under a/b/c."""
  parts = tuple(int(p) if p.isdigit() else p for p in name.split('/'))
  index = next((p for p in parts if isinstance(p, int)), None)
  if scanned and index is not None:
    parts = tuple(p for p in parts if p != index)
  leaves = [x[index] if scanned and index is not None else x
            for path, x in nnx.traversals.flatten_mapping(tree).items()
            if path[:len(parts)] == parts]
  assert leaves, name
  return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves))


def test_step_norms_match_jax_grad_and_health_changes_nothing_else(tiny_config):
  config = tiny_config
  config.model.scan_layers = scan = True  # each layer of the stack apart, named as unscanned
  mesh, setup, batch = _setup_and_batch(config)
  params, off_state, off_metrics = _step(config, mesh, setup, batch)
  config.health.every = 1
  _, on_state, on_metrics = _step(config, mesh, setup, batch)

  assert not any(k.startswith('health/') for k in off_metrics)
  for a, b in zip(jax.tree.leaves(off_state), jax.tree.leaves(on_state)):
    np.testing.assert_array_equal(a, b)  # training itself is bit for bit the same
  assert {k: v for k, v in on_metrics.items() if k != 'health/norms'} == off_metrics

  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  loss = lambda p: setup.task.loss(setup.model(p), batch, nnx.Rngs(dropout=key))[0]
  grads = jax.jit(jax.grad(loss))(params)
  updates = jax.tree.map(np.subtract, on_state['params'], params)
  names = [name for name, _ in health.layers(setup.param_template)]
  assert 'blocks/layers/1/attention/query' in names and 'embed' in names and 'positions' in names
  for tree, got in zip((grads, params, updates), on_metrics['health/norms']):
    want = [_hand_norm(tree, name, scan) for name in names]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)


def test_scanned_layers_are_named_as_unscanned_ones(tiny_config):
  names = {}
  for scan in (False, True):
    tiny_config.model.scan_layers = scan
    template = state_lib.make_setup(tiny_config, sharding.make_mesh(tiny_config.mesh))
    names[scan] = [name for name, _ in health.layers(template.param_template)]
  assert names[True] == names[False]
  assert len(names[True]) == 2 * 8 + 3  # 8 modules a block, embed, positions, final_norm


class DeepSigmoid(nnx.Module):
  """No residuals, sigmoids all the way: the first layers' gradients vanish."""

  def __init__(self, depth, width, rngs):
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.sigmoid(layer(x))
    return x


def test_vanishing_gradients_name_the_first_layers():
  model = DeepSigmoid(depth=12, width=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
  layer_list = health.layers(nnx.state(model, nnx.Param))
  norms = health.layer_norms(nnx.to_pure_dict(grads), layer_list)
  detector = health.Detector([n for n, _ in layer_list],
                             _health(vanishing_fraction=1e-2, exploding_factor=1e6))
  vanishing, exploding, _ = detector.check(norms)
  assert not exploding
  assert len(vanishing) >= 2 and vanishing == [f'layers/{i}' for i in range(len(vanishing))]
  assert 'layers/11' not in vanishing


def test_growth_over_the_window_is_exploding_and_survives_a_restore():
  cfg = _health(window=2, growth_factor=10.0)
  detector = health.Detector(['a', 'b', 'c'], cfg)
  assert detector.check([1.0, 1.0, 1.0])[:2] == ([], [])
  assert detector.check([2.0, 1.0, 1.0])[:2] == ([], [])
  resumed = health.Detector(['a', 'b', 'c'], cfg)
  resumed.restore(detector.state())
  for d in (detector, resumed):  # 'a' grew 11x over the last 2 checks, 'c' is not finite
    assert d.check([11.0, 1.0, np.nan])[:2] == ([], ['a', 'c'])


def test_too_high_a_learning_rate_is_reported_as_exploding_across_a_resume(tmp_path):
  args = ('--config.optim.learning_rate=10', '--config.health.every=1', '--config.health.window=2',
          '--config.health.growth_factor=10', '--config.train.steps=4',
          '--config.train.eval_every=0', '--config.task.num_samples=0')
  first = run_train(tmp_path, *args, '--config.train.stop_after=2')
  assert first.returncode == 0, first.stderr
  # Step 3's growth check compares with step 1: the resumed run knows it from the checkpoint.
  result = run_train(tmp_path, *args)
  assert result.returncode == 0, result.stderr
  assert 'Resumed from the checkpoint at step 2' in result.stdout
  lines = [l for l in result.stdout.splitlines() if 'exploding gradients in' in l]
  assert lines and lines[0].startswith('step 3: gradient health:')
  named = lines[0].split('exploding gradients in ')[1].split(',')[0]
  records = {r['step']: r for r in metrics.read_metrics(tmp_path)}
  assert records[3]['health/exploding_layers'] >= 1 and records[1]['health/exploding_layers'] == 0
  assert records[3][f'health/grad_norm/{named}'] > 10 * records[1][f'health/grad_norm/{named}']


@pytest.mark.parametrize('key, value', [('every', -1), ('vanishing_fraction', 1.0),
                                        ('exploding_factor', 1.0), ('growth_factor', 0.5),
                                        ('window', 0)])
def test_bad_health_config_is_a_one_line_error(key, value):
  config = default.get_config('tiny')
  config.health[key] = value
  with pytest.raises(config_check.ConfigError, match=f'^health.{key}: ') as error:
    config_check.validate(config, num_devices=8, num_processes=1)
  assert '\n' not in str(error.value)
