"""LoRA (finetune.lora_rank): adapters train on a frozen backbone, sharded as on one device, resume
bit for bit, and merge into the kernels for evaluation and export."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import nnx

from configs import default, encoder_classify, saved
from models import MODELS, lora
from parallel import sharding
from tests.test_train_e2e import run_train, saved_state
from tools import hf
from training import config_check, evaluate, warm_start
from training import state as state_lib
from training import step as step_lib

ADAPTED = {'query', 'key', 'value', 'out', 'up', 'down'}  # every target of a GELU MLP


def _save_params(directory, params):
  """A params-only checkpoint that `init_from` loads (as `python -m tools.hf import` writes)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / 'state', {'params': params})
  checkpointer.wait_until_finished()
  return str(directory)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_lora(config, rank=4, targets=','.join(sorted(ADAPTED))):
  config.finetune.lora_rank, config.finetune.lora_targets = rank, targets
  return config


@pytest.mark.parametrize('name,scan', [('transformer', True), ('encoder', False)])
def test_merged_adapters_give_the_adapted_models_logits(name, scan):
  config = _with_lora(default.get_config('tiny') if name == 'transformer'
                      else encoder_classify.get_config('tiny'))
  config.model.scan_layers, config.model.head = scan, 'mlm'  # the encoder: logits per token
  adapted_config = lora.model_config(config.model, config.finetune)
  adapted = MODELS[name].Model(adapted_config, rngs=nnx.Rngs(0))
  params = _params(adapted)
  # B starts at zero (the adapted model is the base model); give it values so merging matters.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.key(len(path)), x.shape) * 0.1
                       if path[-1].key == 'lora_b' else x), params)
  nnx.update(adapted, params)
  plain = MODELS[name].Model(config.model, rngs=nnx.Rngs(1))
  merged = lora.merge(params, adapted_config)
  nnx.update(plain, merged)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 1, 200)
  np.testing.assert_allclose(plain(tokens), adapted(tokens), atol=1e-5)
  query = lambda p: p['blocks']['layers']['attention']['query']['kernel'] if scan else (
      p['blocks']['layers'][0]['attention']['query']['kernel'])
  assert np.abs(query(merged) - query(params)).min() > 0  # every weight moved


@pytest.fixture(scope='module')
def encoder_run(tmp_path_factory):
  """An encoder classifier with adapters on every layer, started from a saved backbone (the
  classifier and pooler are new), 3 steps on one device and on a 2 fsdp x 2 tensor x 2 data
  mesh: (initial params, the frozen ones, [(losses, final state)] per layout)."""
  config = _with_lora(encoder_classify.get_config('tiny'))
  config.model.dropout_rate = 0.0
  base = MODELS['encoder'].Model(config.model, rngs=nnx.Rngs(7))
  backbone = {k: v for k, v in _params(base).items() if k not in ('classifier', 'pooler')}
  config.init_from = _save_params(tmp_path_factory.mktemp('backbone'), backbone)
  rng = np.random.default_rng(0)
  size, length = config.data.global_batch_size, config.data.seq_len
  batches = [{'inputs': rng.integers(1, 256, (size, length), dtype=np.int32),
              'label': rng.integers(0, config.model.num_classes, size, dtype=np.int32)}
             for _ in range(3)]
  runs = []
  for sizes, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                         (dict(data=2, fsdp=2, tensor=2), jax.devices())):
    config.mesh.update(sizes)
    mesh = sharding.make_mesh(config.mesh, devices)
    setup = state_lib.make_setup(config, mesh)
    with sharding.activate(mesh, config.mesh.rules):
      state, _ = warm_start.load(config.init_from, state_lib.init_state(config, setup))
      initial = jax.device_get(state['params'])
      train_step, _ = step_lib.compile_steps(setup, config, mesh)
      losses = []
      for batch in batches:
        state, metrics = train_step(state, batch)
        losses.append(float(metrics['train/loss']))
    runs.append((losses, jax.device_get(state)))
  return initial, setup.frozen, runs


def _leaves(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_only_adapters_and_the_new_head_train_and_the_backbone_stays_bitwise(encoder_run):
  initial, frozen, runs = encoder_run
  before, after, frozen = _leaves(initial), _leaves(runs[0][1]['params']), _leaves(frozen)
  for name, value in after.items():
    adapter = 'lora_' in name
    new_head = 'classifier' in name or 'pooler' in name
    assert frozen[name] == (not (adapter or new_head)), name
    if frozen[name]:
      np.testing.assert_array_equal(value, before[name], err_msg=name)
    elif 'lora_a' not in name:  # A moves too, but only once B is no longer zero
      assert not np.array_equal(value, before[name]), name
  adapted = {name.split("'")[-4] for name in after if 'lora_b' in name}
  assert adapted == ADAPTED
  # Adam's moments only for what trains: that is what makes LoRA cheap.
  moments = sum(x.size for x in jax.tree.leaves(runs[0][1]['opt_state']))
  trained = sum(x.size for name, x in after.items() if not frozen[name])
  assert moments < 2 * trained + 100 < sum(x.size for x in after.values())


def test_a_sharded_lora_run_matches_one_device(encoder_run):
  _, _, (single, sharded) = encoder_run
  np.testing.assert_allclose(sharded[0], single[0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               sharded[1], single[1])


@pytest.mark.parametrize('key,value,message', [
    ('lora_rank', -1, 'finetune.lora_rank: must be >= 0'),
    ('lora_targets', 'query,attention', "finetune.lora_targets: unknown 'attention'"),
    ('lora_targets', 'gate', "finetune.lora_targets: 'gate': model.mlp='gelu' has no gate"),
])
def test_lora_config_errors_name_the_key(key, value, message):
  config = _with_lora(default.get_config('tiny'))
  config.init_from = '/somewhere'
  config.finetune[key] = value
  with pytest.raises(config_check.ConfigError, match=f'^{message}'):
    config_check.check_lora(config, MODELS['transformer'])


def test_lora_needs_a_model_with_such_layers_and_a_backbone():
  config = _with_lora(default.get_config('tiny'))
  with pytest.raises(config_check.ConfigError, match='^finetune.lora_rank: needs init_from'):
    config_check.check_lora(config, MODELS['transformer'])
  config.init_from = '/somewhere'
  with pytest.raises(config_check.ConfigError,
                     match="^finetune.lora_rank: model.name='cnn' has no layers LoRA adapts"):
    config.model.name = 'cnn'
    config_check.check_lora(config, MODELS['cnn'])


LORA = ['--config.finetune.lora_rank=4', '--config.finetune.lora_alpha=8']
SHORT = ['--config.train.steps=4', '--config.train.checkpoint_every=2',
         '--config.train.eval_every=0', '--config.task.num_samples=0']


@pytest.fixture(scope='module')
def decoder_runs(tmp_path_factory):
  """The tiny decoder from a saved base model, with adapters on query and value: one run
  unbroken, one stopped at step 2 and resumed. (base params, unbroken workdir, resumed)."""
  config = default.get_config('tiny')
  base = _params(MODELS['transformer'].Model(config.model, rngs=nnx.Rngs(3)))
  init_from = _save_params(tmp_path_factory.mktemp('base'), base)
  unbroken, resumed = tmp_path_factory.mktemp('unbroken'), tmp_path_factory.mktemp('resumed')
  cache = tmp_path_factory.mktemp('cache')  # one compile of the train step for all three runs
  args = [*LORA, *SHORT, f'--config.init_from={init_from}', f'--compile_cache={cache}']
  outputs = []
  for workdir, more in ((unbroken, []), (resumed, ['--config.train.stop_after=2']),
                        (resumed, [])):
    result = run_train(workdir, *args, *more)
    assert result.returncode == 0, result.stderr
    outputs.append(result.stdout)
  assert 'of them trained' in outputs[0] and 'Resumed from the checkpoint' in outputs[2]
  return base, unbroken, resumed


def test_a_resumed_lora_run_matches_an_unbroken_one_bit_for_bit(decoder_runs):
  base, unbroken, resumed = decoder_runs
  reference, again = saved_state(unbroken, 4), saved_state(resumed, 4)
  assert jax.tree.structure(reference) == jax.tree.structure(again)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(reference['params']['blocks']['layers']['0']['mlp']['up']['kernel'],
                                base['blocks']['layers'][0]['mlp']['up']['kernel'])


def test_evaluate_with_merged_adapters_gives_the_same_figures(decoder_runs):
  _, workdir, _ = decoder_runs
  config = saved.load(str(workdir))
  config.train.eval_every = 1  # as train.py --mode=evaluate sets it: the task builds its eval set
  figures = [evaluate.evaluate(config, str(workdir), 'validation', '', merge_lora=merge)
             for merge in (False, True)]
  unmerged, merged = ({k: v for k, v in f.items() if isinstance(v, float)} for f in figures)
  assert merged.keys() == unmerged.keys() and 'loss' in merged
  assert merged == pytest.approx(unmerged, rel=1e-5)
  assert sorted(os.listdir(workdir / 'evaluations')) == ['validation-4-merged.json',
                                                        'validation-4.json']


def test_export_writes_the_merged_kernels(decoder_runs, tmp_path):
  base, workdir, _ = decoder_runs
  hf.export_run(str(workdir), 0, str(tmp_path))
  tensors = safetensors.numpy.load_file(str(tmp_path / 'model.safetensors'))
  assert not any('lora' in name for name in tensors)
  query = saved_state(workdir, 4)['params']['blocks']['layers']['0']['attention']['query']
  merged = query['kernel'] + 8 / 4 * query['lora_a'] @ query['lora_b']
  exported = tensors['transformer.h.0.attn.c_attn.weight'][:, :merged.shape[1]]
  np.testing.assert_allclose(exported, merged, rtol=1e-6, atol=1e-7)
  assert not np.allclose(exported, base['blocks']['layers'][0]['attention']['query']['kernel'])
