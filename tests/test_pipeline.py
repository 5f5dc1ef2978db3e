"""Pipeline stages (parallel/pipeline.py): the same step as one device, resumable, checked."""

import importlib.util
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default, vit
from hardware import tpu_slices
from parallel import pipeline, sharding
from tests.test_sharding import packed_batch
from tests.test_train_e2e import run_train, saved_state
from training import aot, config_check
from training import state as state_lib


def _config(scan=True, **model):
  config = default.get_config('tiny')  # 32 tokens, width 32
  config.data.global_batch_size = 16  # 4 rows per shard of fsdp=4
  config.model.update(num_layers=4, scan_layers=scan)
  config.model.update(model)
  return config


def _batch(config):
  rng = np.random.default_rng(0)
  shape = (config.data.global_batch_size, config.data.seq_len + 1)
  return packed_batch(rng.integers(0, 256, shape, dtype=np.int32), rng.random(shape) < 0.05)


def _run(config, mesh_sizes, devices):
  """(logits, gradients, parameters after one optimizer update) on this mesh, on the host, and
  the compiled program's text."""
  config.mesh.update(mesh_sizes)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = state_lib.make_setup(config, mesh)
  batch = _batch(config)

  def step(params, opt_state):
    def loss(p):
      model = setup.model(p)
      return setup.task.loss(model, batch, nnx.Rngs(dropout=0))[0], model(batch['tokens'][:, :-1])
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, _ = setup.tx.update(grads, opt_state, params)
    return logits, grads, optax.apply_updates(params, updates)

  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    compiled = jax.jit(step).lower(state['params'], state['opt_state']).compile()
    return jax.device_get(compiled(state['params'], state['opt_state'])), compiled.as_text()


def _assert_close(run, reference):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), run[0],
               reference[0])
  # Each stage's activations go on to the next stage's devices by a collective-permute.
  assert 'collective-permute' in run[1]


ONE = dict(stage=1, data=1, fsdp=1, tensor=1)


@pytest.fixture(scope='module')
def scanned_reference():
  return _run(_config(), ONE, jax.devices()[:1])


@pytest.mark.parametrize('mesh_sizes, model', [
    (dict(stage=2), {}),  # on 2 devices, as on 4 and 8 below
    (dict(stage=4), {}),
    (dict(stage=2, fsdp=4), dict(remat='full', pipeline_microbatches=4)),
    (dict(stage=4, fsdp=2), dict(remat='names', pipeline_microbatches=8)),
], ids=['2_stages', '4_stages', '2_stages_fsdp4_remat', '4_stages_fsdp2_remat_names'])
def test_stages_match_one_device(scanned_reference, mesh_sizes, model):
  sizes = {**ONE, **mesh_sizes}
  devices = jax.devices()[:sizes['stage'] * sizes['fsdp']]
  _assert_close(_run(_config(**model), sizes, devices), scanned_reference)


def test_unscanned_layers_match_one_device():
  reference = _run(_config(scan=False, num_layers=2), ONE, jax.devices()[:1])
  run = _run(_config(scan=False, num_layers=2, remat='dots'),
             dict(stage=2, data=1, fsdp=2, tensor=2), jax.devices())
  _assert_close(run, reference)


def test_each_stage_holds_its_own_layers():
  config = _config()
  config.mesh.update(stage=4, data=2, fsdp=1, tensor=1)
  setup = state_lib.make_setup(config, sharding.make_mesh(config.mesh))
  kernel = setup.abstract_state['params']['blocks']['layers']['mlp']['up']['kernel']
  assert kernel.shape[0] == 4 and kernel.sharding.shard_shape(kernel.shape)[0] == 1


def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0
  assert pipeline.bubble_fraction(4, 4) == 3 / 7


@pytest.mark.parametrize('config, model, message', [
    (default, dict(num_layers=3), 'model.num_layers: 3 is not divisible by the 2 pipeline'),
    (default, dict(pipeline_microbatches=3),
     'model.pipeline_microbatches: 3 micro-batches do not divide the 2 examples of each data'),
    (vit, {}, "mesh.stage: 2 pipeline stages (mesh.stage x mesh.dcn_stage) need a model with a "
     "layer stack to split; model.name='vit' has none (transformer has)"),
])
def test_one_line_errors(config, model, message):
  config = config.get_config('tiny')
  config.model.update(model)
  config.mesh.stage = 2
  with pytest.raises(config_check.ConfigError) as error:
    config_check.validate(config, 8, 1)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_a_run_with_stages_resumes_bit_for_bit(tmp_path):
  """The tiny run (8 steps, checkpoints at 4 and 8) with dropout over 2 stages, then again
  from its step-4 checkpoint."""
  args = ['--config.mesh.stage=2', '--config.model.dropout_rate=0.1',
          '--config.train.eval_every=0', '--config.task.num_samples=0']
  unbroken = tmp_path / 'unbroken'
  assert run_train(unbroken, *args).returncode == 0
  resumed = tmp_path / 'resumed'
  shutil.copytree(unbroken, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '8')
  result = run_train(resumed, *args)
  assert result.returncode == 0 and 'Resumed from the checkpoint at step 4' in result.stdout
  for a, b in zip(*(jax.tree.leaves(saved_state(run, 8)) for run in (resumed, unbroken))):
    np.testing.assert_array_equal(a, b)


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='needs libtpu')


@needs_libtpu
def test_dcn_stages_put_each_stage_on_its_own_slice():
  config = default.get_config('multislice')
  config.mesh.update(dcn_data=1, dcn_stage=-1)
  mesh = sharding.make_mesh(config.mesh, tpu_slices.devices('2xv5e-8'))
  assert dict(mesh.shape) == {'stage': 2, 'data': 1, 'fsdp': 8, 'tensor': 1}
  for index, stage in enumerate(mesh.devices):
    assert {d.slice_index for d in stage.flat} == {index}


@needs_libtpu
def test_stages_across_slices_compile_for_tpu_and_report_the_bubble():
  config = default.get_config('tiny,llama,multislice')
  config.model.update(scan_layers=True, pipeline_microbatches=4)
  config.mesh.update(dcn_data=1, dcn_stage=-1)  # a stage per slice
  config.data.global_batch_size = 16  # 4 rows per fsdp shard: 4 micro-batches of 1
  report = aot.compile_report(config, '2xv5e-4')
  assert report.mesh == {'stage': 2, 'data': 1, 'fsdp': 4, 'tensor': 1} and report.fits
  printed = aot.format_report(report, config)
  assert 'pipeline: 2 stages x 4 micro-batches (GPipe): bubble (S-1)/(M+S-1) = 20.0%' in printed
  assert 'per stage (1 layers on 4 devices)' in printed
