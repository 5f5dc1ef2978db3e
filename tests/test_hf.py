"""Hugging Face weights in and out (training/hf.py).

The logits tests build small random GPT-2 and Llama models with `transformers` and `torch` (the
test-only extra: pip install -e '.[test,hf]') and are skipped without them, as in CI, which
installs `.[test,tpu]`. The other tests need only safetensors and always run.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import default
from models import transformer
from tests.conftest import REPO
from training import hf, warm_start

TOLERANCE = 1e-4  # float32 logits, max abs difference
PRESETS = {hf.GPT2: 'tiny', hf.LLAMA: 'tiny,llama'}  # llama: 4 heads, 2 kv heads, untied


def _model_config(family, scan_layers, **keys):
  m = default.get_config(PRESETS[family]).model
  m.update(scan_layers=scan_layers, dtype='float32', **keys)
  return m


def _random_params(m, seed=0):
  """Every parameter random (norm scales and biases too), so a misplaced one shows."""
  model = nnx.eval_shape(lambda: transformer.Model(m, rngs=nnx.Rngs(params=0)))
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [(0.1 * rng.standard_normal(x.shape)).astype(np.float32)
                                      for x in leaves])


def _podium_logits(m, params, tokens):
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: transformer.Model(m, rngs=nnx.Rngs(params=0))), nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  return np.asarray(nnx.merge(graphdef, state)(tokens))


def _tokens(vocab_size):
  return np.random.default_rng(1).integers(0, vocab_size, (2, 24))


def _params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- no torch ------------------------------------------------------------------------------

def test_norm_eps_must_be_positive():
  config = default.get_config('tiny')
  config.model.norm_eps = 0.0
  with pytest.raises(ValueError, match='model.norm_eps: must be positive'):
    transformer.validate(config.model, config)


def _write_config(directory, **hf_config):
  directory.mkdir(exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(hf_config))
  return directory


def test_unknown_model_type_is_a_one_line_error(tmp_path):
  with pytest.raises(hf.HFError, match="model_type='mistral'") as error:
    hf.from_hf(_write_config(tmp_path, model_type='mistral'))
  assert '\n' not in str(error.value)


def test_unsupported_llama_feature_names_the_hf_key(tmp_path):
  llama = dict(model_type='llama', num_hidden_layers=1, num_attention_heads=2, hidden_size=8,
               intermediate_size=16, max_position_embeddings=16, vocab_size=32)
  with pytest.raises(hf.HFError, match=r"^rope_scaling: rope_type='llama3'"):
    hf.from_hf(_write_config(tmp_path / 'a', **llama, rope_scaling={'rope_type': 'llama3'}))
  with pytest.raises(hf.HFError, match='^attention_bias=True'):
    hf.from_hf(_write_config(tmp_path / 'b', **llama, attention_bias=True))


def test_export_rejects_a_model_no_hf_family_has(tmp_path):
  m = _model_config(hf.GPT2, False, norm='rmsnorm')
  with pytest.raises(hf.HFError, match="model.norm='rmsnorm' has no equivalent in a gpt2"):
    hf.to_hf(m, _random_params(m), tmp_path)


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('family', sorted(PRESETS))
def test_podium_to_hf_files_and_back_is_exact(tmp_path, family, scan_layers):
  m = _model_config(family, scan_layers, norm_eps=1e-6)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  overrides, back = hf.from_hf(tmp_path, scan_layers=scan_layers)
  assert {k: m[k] for k in overrides} == overrides
  _params_equal(back, params)


def test_sharded_checkpoint_reads_as_one_file(tmp_path):
  m = _model_config(hf.LLAMA, False)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  (tmp_path / 'model.safetensors').unlink()
  weight_map = {}
  for shard, names in enumerate(np.array_split(sorted(tensors), 3)):
    filename = f'model-{shard + 1:05d}-of-00003.safetensors'
    safetensors.numpy.save_file({n: tensors[n] for n in names}, tmp_path / filename)
    weight_map.update(dict.fromkeys(names, filename))
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  _params_equal(hf.from_hf(tmp_path)[1], params)


def test_import_cli_writes_a_run_that_init_from_and_export_read(tmp_path):
  m = _model_config(hf.LLAMA, False, norm_eps=1e-6, rope_theta=5000.0)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path / 'hf')
  workdir = tmp_path / 'imported'
  result = subprocess.run(
      [sys.executable, '-m', 'training.hf', 'import', f'--hf_dir={tmp_path / "hf"}',
       f'--workdir={workdir}', '--config=configs/default.py:tiny,llama',
       '--config.model.scan_layers=true'], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  # Only what differs from the given config is printed.
  assert result.stdout.split('init_from=')[1].split()[1:] == [
      '--config.model.rope_theta=5000.0', '--config.model.norm_eps=1e-06']

  scanned = _model_config(hf.LLAMA, True, norm_eps=1e-6, rope_theta=5000.0)
  template = jax.tree.map(jax.numpy.asarray, _random_params(scanned, seed=1))
  loaded, count = warm_start.load(str(workdir), {'params': template})
  assert count == len(jax.tree.leaves(template))
  _params_equal(jax.tree.map(np.asarray, loaded['params']), hf.from_hf(tmp_path / 'hf', True)[1])

  hf.export_run(str(workdir), 0, tmp_path / 'exported')  # the export command, in-process
  _params_equal(hf.from_hf(tmp_path / 'exported')[1], params)


# --- against transformers ------------------------------------------------------------------

def _torch_and_transformers():
  return pytest.importorskip('torch'), pytest.importorskip('transformers')


def _hf_model(family, directory):
  """A small random HF model of `family`, saved to `directory`; (model, its logits)."""
  torch, transformers = _torch_and_transformers()
  torch.manual_seed(0)
  if family == hf.GPT2:
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, n_inner=80, layer_norm_epsilon=1e-5,
                                     bos_token_id=0, eos_token_id=0, attn_implementation='eager')
    model = transformers.GPT2LMHeadModel(config)
  else:  # grouped-query attention, and an epsilon that is not podium's default
    config = transformers.LlamaConfig(vocab_size=96, max_position_embeddings=32, hidden_size=32,
                                      intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-6, rope_theta=5000.0,
                                      attn_implementation='eager')
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # every tensor random; embeddings small, as trained ones are
    for name, p in model.named_parameters():
      scale = 0.02 if name.endswith(('wte.weight', 'embed_tokens.weight')) else 0.1
      norm_scale = p.ndim == 1 and name.endswith('weight')
      p.copy_(scale * torch.randn_like(p) + (1.0 if norm_scale else 0.0))
  model.save_pretrained(directory, safe_serialization=True)
  return model, _hf_logits(model, _tokens(96))


def _hf_logits(model, tokens):
  torch, _ = _torch_and_transformers()
  with torch.no_grad():
    return model.eval()(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('family', sorted(PRESETS))
def test_imported_weights_give_the_hf_logits(tmp_path, family, scan_layers):
  _, expected = _hf_model(family, tmp_path)
  overrides, params = hf.from_hf(tmp_path, scan_layers=scan_layers)
  m = _model_config(family, scan_layers, **overrides)
  difference = np.abs(_podium_logits(m, params, _tokens(96)) - expected).max()
  print(f'HF -> podium {family} scan_layers={scan_layers}: max abs logits difference '
        f'{difference:.2e}')
  assert difference <= TOLERANCE
  if family == hf.LLAMA:  # rms_norm_eps=1e-6 is read: podium's default 1e-5 would miss
    m.norm_eps = 1e-5
    assert np.abs(_podium_logits(m, params, _tokens(96)) - expected).max() > 10 * TOLERANCE


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('family', sorted(PRESETS))
def test_exported_weights_give_podium_logits_in_transformers(tmp_path, family, scan_layers):
  torch, transformers = _torch_and_transformers()
  # Neither value is transformers' default, so each must be read from the written config.json.
  m = _model_config(family, scan_layers, norm_eps=1e-4, rope_theta=5000.0)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation='eager')
  tokens = _tokens(m.vocab_size)
  difference = np.abs(_hf_logits(model, tokens) - _podium_logits(m, params, tokens)).max()
  print(f'podium -> HF {family} scan_layers={scan_layers}: max abs logits difference '
        f'{difference:.2e}')
  assert difference <= TOLERANCE
