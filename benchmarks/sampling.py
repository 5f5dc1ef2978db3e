"""Sampling speed: the key/value cache against rerunning the whole sequence for every token.

`python benchmarks/sampling.py [--config=configs/default.py[:presets]] [--new_tokens=256]
[--batch=8] [--repeats=3]`

A freshly initialised model of the config (its `model.max_len` raised to hold the prompt and
the new tokens) continues `--batch` prompts by `--new_tokens` bytes, greedily, both ways.
Prints, per way, the compile time and the best of `--repeats` timed runs (seconds, and new
tokens per second over the batch), the speed-up, and whether the two agree token for token.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from models import MODELS  # pylint: disable=wrong-import-position
from tasks import lm_samples  # pylint: disable=wrong-import-position

PROMPT = 'def main(argv):\n'


def _time(sample, params, prompt_NxP, lengths_N, repeats):
  """(compile + first run seconds, best run seconds, tokens [N, new])."""
  started = time.perf_counter()
  tokens = jax.block_until_ready(sample(params, prompt_NxP, lengths_N, jax.random.key(0)))
  first = time.perf_counter() - started
  best = float('inf')
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(sample(params, prompt_NxP, lengths_N, jax.random.key(0)))
    best = min(best, time.perf_counter() - started)
  return first, best, np.asarray(tokens)


def main(argv):
  del argv
  config = _CONFIG.value
  new, batch = _NEW_TOKENS.value, _BATCH.value
  config.model.max_len = max(config.model.max_len, len(PROMPT) + new)
  model = MODELS[config.model.name].Model(config.model, rngs=nnx.Rngs(params=config.seed))
  graphdef, template = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(template)

  def make_model(p):
    nnx.replace_by_pure_dict(template, p)
    return nnx.merge(graphdef, template)

  prompt_NxP = np.tile(np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32), (batch, 1))
  lengths_N = np.full(batch, len(PROMPT), np.int32)
  greedy = lambda logits, key: lm_samples.choose(logits, key, temperature=0.0)
  m = config.model
  print(f'{jax.default_backend()} ({os.cpu_count()} CPUs): {m.num_layers} layers, width '
        f'{m.embed_dim}, {m.position} positions, max_len {m.max_len}; batch {batch}, '
        f'prompt {len(PROMPT)} bytes, {new} new tokens, greedy')
  results = {}
  for name, how in (('kv cache', lm_samples._sample_cached),  # pylint: disable=protected-access
                    ('recompute', lm_samples._sample_recomputed)):  # pylint: disable=protected-access
    sample = jax.jit(lambda *a, how=how: how(make_model, greedy, m.max_len, new, *a))
    first, best, tokens = _time(sample, params, prompt_NxP, lengths_N, _REPEATS.value)
    results[name] = (best, tokens)
    print(f'{name:<10} compile+first {first:6.2f} s   best {best:7.3f} s   '
          f'{batch * new / best:9.0f} tokens/s')
  print(f'speed-up {results["recompute"][0] / results["kv cache"][0]:.1f}x; same tokens: '
        f'{np.array_equal(results["kv cache"][1], results["recompute"][1])}')


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', os.path.join(REPO, 'configs', 'default.py'),
                                            'A decoder config (configs/default.py and presets).')
  _NEW_TOKENS = flags.DEFINE_integer('new_tokens', 256, 'Tokens to sample after the prompt.')
  _BATCH = flags.DEFINE_integer('batch', 8, 'Prompts sampled together.')
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs after the first (best is shown).')
  app.run(main)
