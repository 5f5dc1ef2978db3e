"""Sampling from the decoder: the key/value-cache path against rerunning the whole sequence,
and the greedy, temperature, top-k and top-p choices."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from models import transformer
from tasks import lm_samples
from tests.test_train_e2e import REPO, run_train
from tools import sample

STYLES = {'gpt2': 'tiny', 'llama': 'tiny,llama'}  # learned positions / rotary, GQA


def _model(style, scan_layers, max_len=64):
  m = default.get_config(STYLES[style]).model
  m.update(scan_layers=scan_layers, max_len=max_len)
  return transformer.Model(m, rngs=nnx.Rngs(params=3))


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('style', sorted(STYLES))
def test_decode_through_the_cache_gives_the_full_forward_logits(style, scan_layers):
  model = _model(style, scan_layers)
  tokens_BxL = jax.random.randint(jax.random.key(0), (3, 24), 0, 256)
  cache = model.init_cache(3, 32)
  prefill = jnp.broadcast_to(jnp.arange(16), (3, 16))
  chunks = [model.decode(tokens_BxL[:, :16], prefill, cache)]
  for i in range(16, 24):  # then one token at a time
    chunks.append(model.decode(tokens_BxL[:, i:i + 1], jnp.full((3, 1), i), chunks[-1][1]))
  cached = jnp.concatenate([logits for logits, _ in chunks], axis=1)
  np.testing.assert_allclose(cached, model(tokens_BxL), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('style', sorted(STYLES))
def test_greedy_with_the_cache_equals_recomputing_token_for_token(style):
  model = _model(style, scan_layers=True)
  graphdef, template = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(template)

  def make_model(p):
    nnx.replace_by_pure_dict(template, p)
    return nnx.merge(graphdef, template)

  prompt_NxP = np.zeros((3, 12), np.int32)  # batched prompts of 4, 12 and 1 bytes
  for row, prompt in enumerate([b'def ', b'import numpy', b'x']):
    prompt_NxP[row, :len(prompt)] = np.frombuffer(prompt, np.uint8)
  lengths_N = np.array([4, 12, 1], np.int32)
  greedy = functools.partial(lm_samples.choose, temperature=0.0)
  sample = lambda how: jax.jit(functools.partial(how, make_model, greedy, 64, 48))(
      params, prompt_NxP, lengths_N, jax.random.key(0))
  cached = sample(lm_samples._sample_cached)  # pylint: disable=protected-access
  recomputed = sample(lm_samples._sample_recomputed)  # pylint: disable=protected-access
  assert cached.shape == (3, 48)
  np.testing.assert_array_equal(cached, recomputed)
  assert len(np.unique(np.asarray(cached))) > 3  # not one token over and over


def test_generate_returns_each_prompt_continued():
  model = _model('gpt2', scan_layers=False)
  graphdef, template = nnx.split(model, nnx.Param)
  texts = lm_samples.generate(lambda p: nnx.merge(graphdef, template), None, ['def ', 'ab'],
                              max_len=64, new_tokens=8, temperature=1.0, top_k=5, seed=1)
  assert [t[:len(p)] for t, p in zip(texts, ['def ', 'ab'])] == ['def ', 'ab']


LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def _draws(n=2000, **keys):
  keys_N = jax.random.split(jax.random.key(0), n)
  pick = jax.vmap(lambda k: lm_samples.choose(LOGITS, k, **keys)[0])
  return np.bincount(np.asarray(pick(keys_N)), minlength=4) / n


def test_greedy_takes_the_most_likely_token():
  assert int(lm_samples.choose(LOGITS, jax.random.key(0), temperature=0.0)[0]) == 0


def test_temperature_one_draws_from_the_softmax_and_lower_sharpens_it():
  np.testing.assert_allclose(_draws(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.035)
  assert _draws(temperature=0.3)[0] > 0.8


def test_top_k_draws_among_the_k_most_likely():
  frequencies = _draws(temperature=1.0, top_k=2)
  assert frequencies[2:].sum() == 0
  np.testing.assert_allclose(frequencies[:2], [0.625, 0.375], atol=0.035)  # renormalised
  assert np.array_equal(_draws(temperature=1.0, top_k=1), [1, 0, 0, 0])


@pytest.mark.parametrize('top_p, allowed', [(0.5, 1), (0.8, 2), (0.81, 3), (1.0, 4)])
def test_top_p_draws_from_the_smallest_set_that_likely(top_p, allowed):
  """The likelier tokens before each have mass 0, 0.5, 0.8, 0.95: a token is kept while the
  mass before it is under top_p."""
  frequencies = _draws(temperature=1.0, top_p=top_p)
  assert frequencies[allowed:].sum() == 0 and (frequencies[:allowed] > 0).all()


def test_a_workdir_samples_as_training_did_and_its_decode_step_exports(tmp_path):
  """Greedy samples from the saved checkpoint equal the ones train.py printed at its end; the
  exported decode step computes what the model's own does."""
  trained = run_train(tmp_path, '--config.task.sample_temperature=0',
                      '--config.task.sample_length=12', '--config.task.num_samples=2')
  assert trained.returncode == 0, trained.stderr
  config, make_model, params = sample.load(str(tmp_path))
  texts = lm_samples.generate(make_model, params, ['def ', 'import '], new_tokens=12,
                              max_len=config.model.max_len, temperature=0.0)
  for text in texts:
    assert f'--- sample ---\n{text}\n' in trained.stdout

  exported = jax.export.deserialize(sample.export_decode_step(make_model, params, 2, 32))
  cache = make_model(params).init_cache(2, 32)
  tokens, positions = jnp.array([[100], [105]]), jnp.array([[0], [0]])
  got = exported.call(jax.tree.leaves(params), tokens, positions, cache)
  want = make_model(params).decode(tokens, positions, cache)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)

  cli = subprocess.run([sys.executable, '-m', 'tools.sample', f'--workdir={tmp_path}',
                        '--prompt=def ', '--temperature=0', '--new_tokens=12'],
                       capture_output=True, text=True, cwd=REPO, check=False)
  assert cli.returncode == 0, cli.stderr
  assert f'--- sample ---\n{texts[0]}\n' in cli.stdout
  bad = subprocess.run([sys.executable, '-m', 'tools.sample',
                        f'--workdir={tmp_path / "nothing"}'], capture_output=True, text=True,
                       cwd=REPO, check=False)
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['model']['norm_eps']  # a run written before the key existed: its default
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert sample.load(str(tmp_path))[0].model.norm_eps == 1e-5
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
      f'tools.sample: error: {tmp_path / "nothing" / "config.json"} does not exist: not a '
      'train.py workdir')
