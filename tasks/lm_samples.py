"""Text samples from a decoder: the end-of-run check that it learnt something. Prompts are
encoded and samples decoded with the run's tokenizer (bytes by default)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import tokenizers
from tasks import base


class Samples(base.Part):
  """At the end of training, prints `task.num_samples` continuations of the prompts."""

  def __init__(self, config, tokenizer=None):
    self.config, self.tokenizer = config, tokenizer

  def at_end(self, run, state, results):
    t = self.config.task
    prompts = [t.sample_prompts[i % len(t.sample_prompts)] for i in range(t.num_samples)]
    make_model = lambda params: run.setup.model(params, state.get('model_state'))
    texts = generate(make_model, state['params'], prompts, max_len=self.config.model.max_len,
                     new_tokens=t.sample_length, temperature=t.sample_temperature,
                     top_k=t.sample_top_k, top_p=t.sample_top_p, seed=self.config.seed,
                     tokenizer=self.tokenizer)
    for text in texts:
      run.announce(f'--- sample ---\n{text}')


def choose(logits_NxV, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """The next token of each row: the most likely at temperature 0, else a draw from the
  softmax at `temperature` over the `top_k` most likely tokens (0: all) and, of those, the
  smallest set whose probability reaches `top_p` (nucleus sampling; 1: all)."""
  if temperature == 0:
    return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  logits_NxV = logits_NxV / temperature
  if top_k:
    kth_Nx1 = jax.lax.top_k(logits_NxV, top_k)[0][:, -1:]
    logits_NxV = jnp.where(logits_NxV < kth_Nx1, -jnp.inf, logits_NxV)
  if top_p < 1:
    sorted_NxV = jnp.sort(logits_NxV, axis=-1)[:, ::-1]
    probs_NxV = jax.nn.softmax(sorted_NxV, axis=-1)
    before_NxV = jnp.cumsum(probs_NxV, axis=-1) - probs_NxV  # mass of the likelier tokens
    floor_Nx1 = jnp.min(jnp.where(before_NxV < top_p, sorted_NxV, jnp.inf), -1, keepdims=True)
    logits_NxV = jnp.where(logits_NxV < floor_Nx1, -jnp.inf, logits_NxV)
  return jax.random.categorical(key, logits_NxV).astype(jnp.int32)


def generate(make_model, params, prompts: list[str], *, max_len: int, new_tokens: int,
             temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             kv_cache: bool = True, tokenizer=None) -> list[str]:
  """Continues each prompt by `new_tokens` tokens (fewer if `max_len` is reached), chosen by
  `choose`, and returns the texts up to the first eos. `tokenizer` (default: bytes) encodes the
  prompts and decodes the samples. With `kv_cache` the prompts are read once into a key/value
  cache and each step runs the model on one new token per row (`Model.decode`); without, each
  step reruns the whole sequence (the reference the cached path is tested and timed against)."""
  tokenizer = tokenizer or tokenizers.load('')
  encoded = [tokenizer.encode(p) for p in prompts]
  new_tokens = min(new_tokens, max_len - max(len(p) for p in encoded))
  prompt_NxP = np.zeros((len(prompts), max(len(p) for p in encoded)), np.int32)
  for row, prompt in enumerate(encoded):
    prompt_NxP[row, :len(prompt)] = prompt
  lengths_N = np.array([len(p) for p in encoded], np.int32)
  sample = functools.partial(_sample_cached if kv_cache else _sample_recomputed, make_model,
                             functools.partial(choose, temperature=temperature, top_k=top_k,
                                               top_p=top_p), max_len, new_tokens)
  out = np.asarray(jax.jit(sample)(params, prompt_NxP, lengths_N, jax.random.key(seed)))
  texts = []
  for row, prompt in zip(out, encoded):
    ends = np.flatnonzero(row == tokenizer.eos_id)  # stop where a document would end
    row = row[:ends[0]] if ends.size else row
    row = row[row < tokenizer.vocab_size]  # the model's padding ids stand for no text
    texts.append(tokenizer.decode(np.concatenate([prompt, row])))
  return texts


def _sample_cached(make_model, pick, max_len, new_tokens, params, prompt_NxP, lengths_N, key):
  """[N, new_tokens] sampled after each row's prompt, through a key/value cache."""
  n, p = prompt_NxP.shape
  # Shorter prompts are padded: their padding's cache entries sit past their own tokens,
  # where no query looks, and are overwritten by the tokens sampled there.
  logits_NxPxV, cache = make_model(params).decode(
      prompt_NxP, jnp.broadcast_to(jnp.arange(p), (n, p)),
      make_model(params).init_cache(n, max_len))

  def step(carry, i):
    logits_NxV, cache, positions_N = carry
    token_N = pick(logits_NxV, jax.random.fold_in(key, i))
    logits_Nx1xV, cache = make_model(params).decode(token_N[:, None], positions_N[:, None],
                                                    cache)
    return (logits_Nx1xV[:, 0], cache, positions_N + 1), token_N

  first = (logits_NxPxV[jnp.arange(n), lengths_N - 1], cache, lengths_N)
  return jax.lax.scan(step, first, jnp.arange(new_tokens))[1].T


def _sample_recomputed(make_model, pick, max_len, new_tokens, params, prompt_NxP, lengths_N,
                       key):
  """As `_sample_cached`, running the model over the whole [N, max_len] buffer every step."""
  n, p = prompt_NxP.shape
  rows_N = jnp.arange(n)
  buffer_NxL = jnp.zeros((n, max_len), jnp.int32).at[:, :p].set(prompt_NxP)

  def step(carry, i):
    buffer_NxL, positions_N = carry
    logits_NxV = make_model(params)(buffer_NxL)[rows_N, positions_N - 1]
    token_N = pick(logits_NxV, jax.random.fold_in(key, i))
    return (buffer_NxL.at[rows_N, positions_N].set(token_N), positions_N + 1), token_N

  return jax.lax.scan(step, (buffer_NxL, lengths_N), jnp.arange(new_tokens))[1].T
