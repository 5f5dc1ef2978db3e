"""Text samples from a byte-level model: the end-of-run check that it learnt something."""

import jax
import jax.numpy as jnp
import numpy as np

from data.pipeline import DOCUMENT_SEPARATOR
from tasks import base


class Samples(base.Part):
  """At the end of training, prints `task.num_samples` continuations of the prompts."""

  def __init__(self, config):
    self.config = config

  def at_end(self, run, state):
    t = self.config.task
    prompts = [t.sample_prompts[i % len(t.sample_prompts)] for i in range(t.num_samples)]
    make_model = lambda params: run.setup.model(params, state.get('model_state'))
    texts = generate(make_model, state['params'], prompts, max_len=self.config.model.max_len,
                     new_tokens=t.sample_length, temperature=t.sample_temperature,
                     seed=self.config.seed)
    for text in texts:
      run.announce(f'--- sample ---\n{text}')


def generate(make_model, params, prompts: list[str], *, max_len: int, new_tokens: int,
             temperature: float, seed: int) -> list[str]:
  """Continues each prompt by `new_tokens` sampled bytes (fewer if `max_len` is reached)."""
  encoded = [p.encode('utf-8') for p in prompts]
  new_tokens = min(new_tokens, max_len - max(len(p) for p in encoded))
  buffer = np.zeros((len(prompts), max_len), np.int32)
  for row, prompt in enumerate(encoded):
    buffer[row, :len(prompt)] = np.frombuffer(prompt, np.uint8)
  positions = np.array([len(p) for p in encoded], np.int32)

  @jax.jit
  def sample_all(params, tokens_NxL, positions_N, key):
    rows = jnp.arange(tokens_NxL.shape[0])

    def sample_one(i, carry):
      tokens_NxL, positions_N = carry
      logits_NxV = make_model(params)(tokens_NxL)[rows, positions_N - 1]
      next_N = jax.random.categorical(jax.random.fold_in(key, i), logits_NxV / temperature)
      return tokens_NxL.at[rows, positions_N].set(next_N), positions_N + 1

    return jax.lax.fori_loop(0, new_tokens, sample_one, (tokens_NxL, positions_N))[0]

  out = np.asarray(sample_all(params, buffer, positions, jax.random.key(seed)))
  texts = []
  for row, prompt in zip(out, encoded):
    continuation = bytes(row[len(prompt):len(prompt) + new_tokens].astype(np.uint8))
    document = continuation.split(bytes([DOCUMENT_SEPARATOR]))[0]  # stop where a file would end
    texts.append((prompt + document).decode('utf-8', 'replace'))
  return texts
