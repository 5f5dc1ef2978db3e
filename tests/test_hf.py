"""Hugging Face weights in and out (tools/hf.py).

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
from models import rotary, transformer
from tests.conftest import REPO
from tools import hf, hf_configs
from training import warm_start

TOLERANCE = 1e-4  # float32 logits, max abs difference
PRESETS = {hf.GPT2: 'tiny', hf.LLAMA: 'tiny,llama'}  # llama: 4 heads, 2 kv heads, untied
# Llama 3.1 / 3.2's rope scaling (HF rope_type 'llama3') at a pretrained length of 16, shorter
# than the tests' 24 tokens; with the tiny models' head dimension 8 and rope_theta 5000 every
# frequency changes: one is interpolated, three are divided by the factor.
LLAMA3_ROPE = dict(rope_type='llama3', factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
LLAMA3_KEYS = dict(rope_scaling='llama3', rope_factor=4.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=16)
# What the round-trip and logits tests cover: (family, model keys beyond its preset).
VARIANTS = {'gpt2': (hf.GPT2, {}), 'llama': (hf.LLAMA, {}), 'llama3': (hf.LLAMA, LLAMA3_KEYS)}
# Llama 3.2 1B's config.json, as its checkpoint carries it.
LLAMA_3_2_1B = {
    'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'head_dim': 64,
    'hidden_act': 'silu', 'hidden_size': 2048, 'intermediate_size': 8192,
    'max_position_embeddings': 131072, 'mlp_bias': False, 'model_type': 'llama',
    'num_attention_heads': 32, 'num_hidden_layers': 16, 'num_key_value_heads': 8,
    'rms_norm_eps': 1e-05, 'rope_theta': 500000.0, 'tie_word_embeddings': True,
    'vocab_size': 128256, 'rope_scaling': {
        'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
        'original_max_position_embeddings': 8192, 'rope_type': 'llama3'}}


def _model_config(family, scan_layers, **keys):
  m = default.get_config(PRESETS[family]).model
  m.update(scan_layers=scan_layers, dtype='float32', **keys)
  return m


def _random_params(m, seed=0, model_module=transformer):
  """Every parameter random (norm scales and biases too), so a misplaced one shows."""
  model = nnx.eval_shape(lambda: model_module.Model(m, rngs=nnx.Rngs(params=0)))
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
  with pytest.raises(hf.HFError, match=r"^rope_scaling: rope_type='yarn' is not supported"):
    hf.from_hf(_write_config(tmp_path / 'a', **llama, rope_scaling={'rope_type': 'yarn'}))
  with pytest.raises(hf.HFError, match=r'^rope_parameters: rope_type llama3 lacks '
                     'low_freq_factor, original_max_position_embeddings$'):
    hf.from_hf(_write_config(tmp_path / 'b', **llama, rope_parameters=dict(
        rope_type='llama3', rope_theta=5e5, factor=8.0, high_freq_factor=4.0)))
  with pytest.raises(hf.HFError, match='^attention_bias=True'):
    hf.from_hf(_write_config(tmp_path / 'c', **llama, attention_bias=True))


def test_llama_1b_preset_is_llama_3_2_1b():
  """Llama 3.2 1B's checkpoint loads into the preset as it is: every tensor of the file has the
  shape of the parameter it goes to, and importing it changes no model key but max_len (the
  longest context it serves, 131072; the preset trains at 8192, and rotary positions have no
  parameters)."""
  m = default.get_config('llama_1b').model
  assert (m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.embed_dim // m.num_heads,
          m.mlp_dim, m.vocab_size) == (2048, 16, 32, 8, 64, 8192, 128256)
  assert (m.rope_theta, m.tie_embeddings, m.norm_eps, m.norm, m.mlp, m.use_bias) == (
      500000.0, True, 1e-5, 'rmsnorm', 'swiglu', False)
  assert (m.rope_scaling, m.rope_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
          m.rope_original_max_len) == ('llama3', 32.0, 1.0, 4.0, 8192)
  overrides = hf_configs.llama_model(LLAMA_3_2_1B)
  assert {k: v for k, v in overrides.items() if m[k] != v} == {'max_len': 131072}

  # The parameters' shapes as zero-byte arrays, named as the checkpoint's tensors.
  abstract = nnx.state(nnx.eval_shape(lambda: transformer.Model(m, rngs=nnx.Rngs(0))), nnx.Param)
  empty = jax.tree.map(lambda x: np.broadcast_to(np.float32(0), x.shape),
                       nnx.to_pure_dict(abstract))
  flat = hf._flat_params(empty, m)  # pylint: disable=protected-access
  table = hf._table(hf.LLAMA, m)  # pylint: disable=protected-access
  shapes = {name: flat[path].shape[::-1] if transposed else flat[path].shape
            for name, (path,), transposed in table}
  d, kv, f = 2048, 8 * 64, 8192
  layer = {'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
           'self_attn.q_proj.weight': (d, d), 'self_attn.k_proj.weight': (kv, d),
           'self_attn.v_proj.weight': (kv, d), 'self_attn.o_proj.weight': (d, d),
           'mlp.gate_proj.weight': (f, d), 'mlp.up_proj.weight': (f, d),
           'mlp.down_proj.weight': (d, f)}
  expected = {'model.embed_tokens.weight': (128256, d), 'model.norm.weight': (d,)}
  expected.update({f'model.layers.{i}.{name}': shape for i in range(16)
                   for name, shape in layer.items()})
  assert shapes == expected  # tied: no lm_head.weight


def test_llama3_rope_frequencies_follow_the_published_formula():
  """The model's rotary frequencies against a numpy transcription of Llama 3.1's reference
  (three cases of wavelength), for the llama_1b preset, whose frequencies span all three."""
  m = default.get_config('llama_1b').model
  head_dim = m.embed_dim // m.num_heads
  freq = 1 / m.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
  wavelength = 2 * np.pi / freq
  low_wavelength = m.rope_original_max_len / m.rope_low_freq_factor
  high_wavelength = m.rope_original_max_len / m.rope_high_freq_factor
  smooth = ((m.rope_original_max_len / wavelength - m.rope_low_freq_factor) /
            (m.rope_high_freq_factor - m.rope_low_freq_factor))
  expected = np.where(
      wavelength < high_wavelength, freq,
      np.where(wavelength > low_wavelength, freq / m.rope_factor,
               (1 - smooth) * freq / m.rope_factor + smooth * freq))
  kinds = (wavelength < high_wavelength).sum(), (wavelength > low_wavelength).sum()
  assert 0 < kinds[0] and 0 < kinds[1] and sum(kinds) < len(freq)  # all three cases occur
  np.testing.assert_allclose(rotary.frequencies(m, head_dim), expected, rtol=2e-6)
  m.rope_scaling = 'none'  # the default: plain rotary, theta^(-2i/K)
  np.testing.assert_allclose(rotary.frequencies(m, head_dim), freq, rtol=2e-6)


@pytest.mark.parametrize('keys, error', [
    (dict(rope_scaling='yarn'), r"^model\.rope_scaling: 'yarn' is not one of none, llama3"),
    (dict(rope_scaling='llama3', position='learned'),
     r"^model\.rope_scaling: 'llama3' needs model\.position=rope"),
    (dict(rope_scaling='llama3', rope_factor=0.5), r'^model\.rope_factor: must be >= 1'),
    (dict(rope_scaling='llama3', rope_low_freq_factor=4.0),
     r'^model\.rope_low_freq_factor: must be positive and below model\.rope_high_freq_factor'),
    (dict(rope_scaling='llama3', rope_original_max_len=0),
     r'^model\.rope_original_max_len: must be positive'),
])
def test_rope_scaling_config_errors_name_the_key(keys, error):
  config = default.get_config('tiny,llama')
  transformer.validate(config.model, config)
  config.model.update(keys)
  with pytest.raises(ValueError, match=error):
    transformer.validate(config.model, config)


def test_rope_scaling_reaches_the_attention():
  """A Llama with and without llama3 scaling: the same parameters give other logits. (The
  parameters are 4x the usual random ones: sharper attention, in which positions weigh more.)"""
  plain = _model_config(hf.LLAMA, False)
  params = jax.tree.map(lambda x: 4 * x, _random_params(plain))
  tokens = _tokens(plain.vocab_size)
  scaled = _model_config(hf.LLAMA, False, **LLAMA3_KEYS)
  difference = np.abs(_podium_logits(scaled, params, tokens) -
                      _podium_logits(plain, params, tokens)).max()
  assert difference > 10 * TOLERANCE


def test_export_rejects_a_model_no_hf_family_has(tmp_path):
  m = _model_config(hf.GPT2, False, norm='rmsnorm')
  with pytest.raises(hf.HFError, match="model.norm='rmsnorm' has no equivalent in a gpt2"):
    hf.to_hf(m, _random_params(m), tmp_path)


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_podium_to_hf_files_and_back_is_exact(tmp_path, variant, scan_layers):
  family, keys = VARIANTS[variant]
  m = _model_config(family, scan_layers, norm_eps=1e-6, **keys)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  # Written as Llama 3.1 and 3.2 files have it, which transformers 4 and 5 both read.
  assert written.get('rope_scaling') == (LLAMA3_ROPE if keys else None)
  overrides, back = hf.from_hf(tmp_path, scan_layers=scan_layers)
  assert {k: m[k] for k in overrides} == overrides
  assert set(keys) <= set(overrides)
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
      [sys.executable, '-m', 'tools.hf', 'import', f'--hf_dir={tmp_path / "hf"}',
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


def _hf_model(family, directory, rope_scaling=None):
  """A small random HF model of `family`, saved to `directory`; (model, its logits).
  `rope_scaling`: the Llama's, e.g. LLAMA3_ROPE."""
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
                                      rope_scaling=rope_scaling, attn_implementation='eager')
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
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_imported_weights_give_the_hf_logits(tmp_path, variant, scan_layers):
  family, keys = VARIANTS[variant]
  _, expected = _hf_model(family, tmp_path, LLAMA3_ROPE if keys else None)
  overrides, params = hf.from_hf(tmp_path, scan_layers=scan_layers)
  assert {k: overrides[k] for k in keys} == keys
  m = _model_config(family, scan_layers, **overrides)
  difference = np.abs(_podium_logits(m, params, _tokens(96)) - expected).max()
  print(f'HF -> podium {variant} scan_layers={scan_layers}: max abs logits difference '
        f'{difference:.2e}')
  assert difference <= TOLERANCE
  if family == hf.LLAMA:  # what is read matters: without it the logits would miss
    if keys:
      m.rope_scaling = 'none'  # plain rotary
    else:
      m.norm_eps = 1e-5  # podium's default, where the file says rms_norm_eps=1e-6
    assert np.abs(_podium_logits(m, params, _tokens(96)) - expected).max() > 10 * TOLERANCE


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_exported_weights_give_podium_logits_in_transformers(tmp_path, variant, scan_layers):
  torch, transformers = _torch_and_transformers()
  family, keys = VARIANTS[variant]
  # No value is transformers' default, so each must be read from the written config.json.
  m = _model_config(family, scan_layers, norm_eps=1e-4, rope_theta=5000.0, **keys)
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation='eager')
  tokens = _tokens(m.vocab_size)
  difference = np.abs(_hf_logits(model, tokens) - _podium_logits(m, params, tokens)).max()
  print(f'podium -> HF {variant} scan_layers={scan_layers}: max abs logits difference '
        f'{difference:.2e}')
  assert difference <= TOLERANCE
