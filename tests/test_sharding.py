"""A sharded train step must give what one device gives, for every mesh layout."""

import importlib.util

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import default
from hardware import tpu_slices
from parallel import sharding
from training import state as state_lib
from training import step as step_lib

LAYOUTS = {
    'data8': dict(data=8, fsdp=1, tensor=1),
    'fsdp8': dict(data=1, fsdp=8, tensor=1),
    'fsdp4_tensor2': dict(data=1, fsdp=4, tensor=2),
    'mixed_2x2x2': dict(data=2, fsdp=2, tensor=2),
}
STEPS = 3


def _run(config, mesh_sizes, devices, batches):
  config.mesh.update(mesh_sizes)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = state_lib.make_setup(config, mesh)
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    losses = []
    for batch in batches:
      state, metrics = train_step(state, batch)
      losses.append(float(metrics['train/loss']))
  return losses, jax.device_get(state)


def _batches(config, seed=0):
  """STEPS batches of random tokens packed as documents of random lengths (~20 tokens), so the
  document masks and positions differ between rows and layouts split them."""
  rng = np.random.default_rng(seed)
  shape = (config.data.global_batch_size, config.data.seq_len + 1)
  return [packed_batch(rng.integers(0, 256, shape, dtype=np.int32), rng.random(shape) < 0.05)
          for _ in range(STEPS)]


def packed_batch(tokens, starts):
  """An LM batch of `tokens` whose documents begin where `starts` (bool, like tokens) is true,
  and at each row's start."""
  starts = starts.copy()
  starts[:, 0] = True
  index = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return {'tokens': tokens, 'segment_ids': np.cumsum(starts, axis=1, dtype=np.int32),
          'positions': (index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
                        ).astype(np.int32)}


def _assert_same_run(run, reference):
  np.testing.assert_allclose(run[0], reference[0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               run[1], reference[1])


@pytest.fixture(scope='module')
def reference():
  config = default.get_config('tiny')
  return _run(config, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], _batches(config))


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_sharded_step_matches_single_device(tiny_config, reference, layout):
  run = _run(tiny_config, LAYOUTS[layout], jax.devices(), _batches(tiny_config))
  _assert_same_run(run, reference)


def test_llama_style_sharded_matches_single_device():
  """Rotary positions and grouped-query heads split over the tensor axis."""
  config = default.get_config('tiny,llama')
  reference = _run(config, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], _batches(config))
  config = default.get_config('tiny,llama')
  run = _run(config, LAYOUTS['mixed_2x2x2'], jax.devices(), _batches(config))
  _assert_same_run(run, reference)


@pytest.mark.parametrize('preset', ['fsdp', 'fsdp_tp'])
def test_presets_shard_parameters(preset):
  config = default.get_config(f'tiny,{preset}')
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  state = state_lib.init_state(config, setup)
  kernel = state['params']['blocks']['layers'][0]['mlp']['up']['kernel']
  mu = state['opt_state'][1].inner_state[0].mu['blocks']['layers'][0]['mlp']['up']['kernel']
  # embed (32) over fsdp, mlp (128) over tensor: each device holds only its shard.
  expected = (8, 64) if preset == 'fsdp_tp' else (4, 128)
  assert kernel.addressable_shards[0].data.shape == expected
  assert mu.sharding == kernel.sharding  # optimizer state is sharded like its parameter


def test_gradient_accumulation_matches_one_big_batch(tiny_config, reference):
  tiny_config.train.grad_accum_steps = 2
  run = _run(tiny_config, LAYOUTS['data8'], jax.devices(), _batches(tiny_config))
  _assert_same_run(run, reference)


# The pod-size presets, shrunk to CPU size but keeping their scan, remat and chunked loss.
SHRUNK = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=64,
              vocab_size=512, loss_chunk=16)
POD_PRESETS = ['llama_1b', 'llama3_8b']


@pytest.mark.parametrize('preset', ['gpt2', 'llama', 'dp', 'fsdp', 'fsdp_tp', 'multislice',
                                    *POD_PRESETS])
def test_every_preset_builds_its_mesh_and_trains(preset):
  config = default.get_config(f'{preset},tiny' if preset in POD_PRESETS else f'tiny,{preset}')
  if preset in POD_PRESETS:
    config.model.update(SHRUNK)
    config.data.seq_len = 64
  losses, state = _run(config, {}, jax.devices(), _batches(config)[:1])
  assert np.all(np.isfinite(losses)) and state['skipped_steps'] == 0


def test_a_dimension_the_mesh_cannot_divide_is_kept_whole_and_reported():
  config = default.get_config('tiny,fsdp_tp')
  config.model.vocab_size = 65  # not divisible by tensor=2
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  assert setup.shardings['params']['embed']['embedding'].spec == PartitionSpec(None, 'fsdp')
  report = sharding.unsharded_params(setup.param_template, mesh, config.mesh.rules)
  assert len(report) == 1 and report[0].startswith('embed.embedding dimension 0 (65)')
  assert 'tensor=2' in report[0]


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu')
def test_multislice_mesh_puts_data_across_slices_and_fsdp_within():
  devices = tpu_slices.devices('2xv5e-8')  # compile-only TPU devices: two slices of 8 chips
  config = default.get_config('multislice')
  mesh = sharding.make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {'stage': 1, 'data': 2, 'fsdp': 8, 'tensor': 1}
  for index, row in enumerate(mesh.devices[0, :, :, 0]):  # one data index = one whole slice
    assert {d.slice_index for d in row} == {index}
