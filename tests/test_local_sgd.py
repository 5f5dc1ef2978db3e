"""Local SGD (train.sync_every > 1): replicas on the data axis, averaged every sync_every steps."""

import jax
import numpy as np
import pytest

from configs import default
from data import pipeline
from parallel import sharding
from tasks import base
from tests.test_faults import _assert_same_state, _losses, _state
from tests.test_multihost import _assert_same_up_to_rounding, _finish, _start
from tests.test_train_e2e import run_train
from training import config_check
from training import state as state_lib
from training import step as step_lib

# Two replicas (the data axis), FSDP over four devices within each; syncs at steps 4 and 8. No
# evaluation (one compile less per run). Dropout on, so its random stream must resume exactly
# too; two data streams, as the two-process run reads them.
LOCAL = ['--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.mesh.tensor=1',
         '--config.train.sync_every=4', '--config.train.steps=8', '--config.train.eval_every=0',
         '--config.train.checkpoint_every=1000', '--config.task.num_samples=0',
         '--config.data.num_streams=2', '--config.model.dropout_rate=0.1']


def _config(**train):
  """Two replicas of one device each (in-process tests compile fastest on two devices)."""
  config = default.get_config('tiny')
  config.mesh.data, config.mesh.fsdp = 2, 1
  config.optim.name, config.optim.grad_clip = 'sgd', 'none'  # linear in the gradients
  config.train.update(train)
  return config


def _train(config, step_config, steps, same_rows=False):
  """(losses, the state after each step, on the host) of `steps` steps of `config`, the step
  compiled with `step_config`; `same_rows`: both halves of every batch the first half's rows."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  setup = state_lib.make_setup(config, mesh)
  batches = iter(setup.task.train_batches(pipeline.RecordStats()))
  place = base.batch_placer(setup.task.batch_spec('train'), mesh, config.mesh.rules)
  losses, states = [], []
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    train_step, _ = step_lib.compile_steps(setup, step_config, mesh)
    for _ in range(steps):
      batch = next(batches)
      if same_rows:
        batch = jax.tree.map(lambda x: np.concatenate([x[:len(x) // 2]] * 2), batch)
      state, metrics = train_step(state, place(batch))
      losses.append(float(metrics['train/loss']))
      states.append(jax.device_get(state))
  batches.close()
  return losses, states


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_syncing_every_step_with_a_plain_outer_step_is_synchronous_training():
  """H=1, outer rate 1, no momentum: the global parameters become the replicas' average, which
  for a linear inner optimiser (SGD with momentum) is the synchronous update."""
  sync_losses, sync_states = _train(_config(), _config(), steps=3)
  local, every_step = _config(sync_every=2), _config()
  for config in (local, every_step):
    config.optim.outer.update(learning_rate=1.0, momentum=0.0)
  local_losses, local_states = _train(local, every_step, steps=3)  # the local step, H=1
  np.testing.assert_allclose(local_losses, sync_losses, rtol=1e-5)
  local_state, sync_state = local_states[-1], sync_states[-1]
  for x, y in zip(_leaves(local_state['params']), _leaves(sync_state['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # Each replica's momentum is its own; their average is the synchronous one.
  for x, y in zip(_leaves(local_state['local']['opt_state']), _leaves(sync_state['opt_state'])):
    np.testing.assert_allclose(x.mean(0), y, rtol=1e-4, atol=1e-6)


def test_replicas_part_after_a_sync_and_meet_at_the_next():
  config = _config(sync_every=2)
  _, (first, synced, apart) = _train(config, config, steps=3)
  # A step after the sync, each replica has moved on its own rows (step 1's rate is 0).
  assert max(np.abs(x[0] - x[1]).max() for x in _leaves(apart['local']['params'])) > 0
  # Global parameters move only at syncs, and every replica restarts from them.
  assert any(not np.array_equal(x, y)
             for x, y in zip(_leaves(first['params']), _leaves(apart['params'])))
  for x, y in zip(_leaves(synced['params']), _leaves(apart['params'])):
    np.testing.assert_array_equal(x, y)
  for x, g in zip(_leaves(synced['local']['params']), _leaves(synced['params'])):
    np.testing.assert_array_equal(x, np.broadcast_to(g, x.shape))


def test_each_replica_draws_its_own_dropout():
  """Both replicas on the same rows still step apart: each has its own dropout stream."""
  config = _config(sync_every=4)
  config.model.dropout_rate = 0.5
  _, states = _train(config, config, steps=2, same_rows=True)  # step 1's rate is 0
  assert max(np.abs(x[0] - x[1]).max() for x in _leaves(states[-1]['local']['params'])) > 0


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('local_sgd')
  result = run_train(workdir, *LOCAL)
  assert result.returncode == 0, result.stderr
  return workdir


def test_stopped_between_syncs_and_resumed_is_bit_for_bit(one_process_run, tmp_path):
  """Stopped at step 6, halfway between the syncs at 4 and 8: the replicas' own parameters and
  optimiser states, the outer momentum and the step resume exactly."""
  first = run_train(tmp_path, *LOCAL, '--config.train.stop_after=6')
  assert first.returncode == 0, first.stderr
  assert max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == 6
  resumed = run_train(tmp_path, *LOCAL)
  assert resumed.returncode == 0, resumed.stderr
  assert _losses(tmp_path) == _losses(one_process_run)
  _assert_same_state(_state(tmp_path, 8), _state(one_process_run, 8))


def test_two_processes_one_replica_each_match_one_process(one_process_run, tmp_path):
  _finish(_start(tmp_path, *LOCAL))
  two, one = _losses(tmp_path), _losses(one_process_run)
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 9))
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=2e-6)
  two, one = _state(tmp_path, 8), _state(one_process_run, 8)
  _assert_same_up_to_rounding(two['local'], one['local'])
  _assert_same_up_to_rounding({'params': two['params']}, {'params': one['params']})
  # The outer momentum sums the replicas' deltas, in which Adam has turned the rounding noise of
  # parameters without training signal (test_multihost.py) into steps of its own rate: up to
  # 1e-4 of the largest momentum, where a different training differs by about all of it.
  for x, y in zip(jax.tree.leaves(two['opt_state']), jax.tree.leaves(one['opt_state'])):
    np.testing.assert_allclose(x, y, atol=1e-4 * max(
        np.abs(m).max() for m in jax.tree.leaves(one['opt_state'])))


@pytest.mark.parametrize('change, error', [
    ({'train.sync_every': 0}, 'train.sync_every: must be >= 1'),
    ({'optim.outer.learning_rate': 0.0}, 'optim.outer.learning_rate: must be > 0'),
    ({'optim.outer.momentum': 1.0}, 'optim.outer.momentum: must be in [0, 1)'),
    ({'init_from': '/some/run'}, 'init_from: cannot start local SGD'),
    ({'optim.schedule': 'reduce_on_plateau'}, 'optim.schedule: reduce_on_plateau'),
    ({'mesh.rules': (('batch', ('fsdp', 'data')),)}, 'mesh.rules: with train.sync_every=4'),
    ({'mesh.rules': (('batch', ('data', 'fsdp')), ('embed', 'data'))},
     "only 'batch' may map to it, not embed"),
    ({'data.global_batch_size': 6}, 'data.global_batch_size: 6 is not divisible by 8'),
])
def test_config_errors_name_the_key(change, error):
  config = _config(sync_every=4)
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.update_from_flattened_dict(change)
  with pytest.raises(config_check.ConfigError) as raised:
    config_check.validate(config, num_devices=8, num_processes=1)
  assert error in str(raised.value)


def test_a_model_with_batchnorm_statistics_is_refused():
  from configs import fashion_mnist_resnet  # pylint: disable=import-outside-toplevel
  config = fashion_mnist_resnet.get_config('tiny')
  config.train.sync_every = 2
  with pytest.raises(config_check.ConfigError, match='train.sync_every: local SGD keeps no model'):
    state_lib.make_setup(config, sharding.make_mesh(config.mesh))
