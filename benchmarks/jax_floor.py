"""What JAX itself costs for the char-level job: the same GPT trained in plain JAX and Optax,
with no podium code, so `benchmarks/whole_run.py --job=char` can be read against a floor.

  python benchmarks/jax_floor.py [--steps=2000] [--data=tinyshakespeare.txt] [--one_arena]

4 layers, 4 heads, 128 wide, MLP 512, sequence 64, batch 12, byte vocabulary, AdamW 1e-3
(b2 0.99) with 100 warmup steps and cosine decay to 0.1: the shape of whole_run.py's `char`
job, without evaluation, checkpoints or logging. Prints the peak RSS after imports, after the
jitted initialisation, after the first step and at the end, and the wall time. `--one_arena`
caps glibc's malloc arenas at one (podium's CPU set-up does not: hardware/cpu_runtime.py says why).
Prints figures only.
"""

import ctypes
import os
import resource
import time

_START = time.time()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps.')
_DATA = flags.DEFINE_string('data', '/work/shared/data/tinyshakespeare.txt', 'A text file.')
_ONE_ARENA = flags.DEFINE_bool('one_arena', False, 'mallopt(M_ARENA_MAX, 1) first.')

VOCAB, WIDTH, LAYERS, HEADS, LENGTH, BATCH, MLP = 256, 128, 4, 4, 64, 12, 512


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _init(key):
  keys = iter(jax.random.split(key, 2 + 4 * LAYERS))
  normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)
  layer = lambda: {'qkv': normal(WIDTH, 3 * WIDTH), 'out': normal(WIDTH, WIDTH),
                   'up': normal(WIDTH, MLP), 'down': normal(MLP, WIDTH),
                   'norm1': jnp.ones(WIDTH), 'norm2': jnp.ones(WIDTH)}
  return {'embed': normal(VOCAB, WIDTH), 'position': normal(LENGTH, WIDTH),
          'layers': [layer() for _ in range(LAYERS)], 'norm': jnp.ones(WIDTH)}


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _logits(params, tokens):
  h = params['embed'][tokens] + params['position']
  causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
  heads = lambda a: a.reshape(BATCH, LENGTH, HEADS, WIDTH // HEADS)
  for layer in params['layers']:
    q, k, v = map(heads, jnp.split(_rms_norm(h, layer['norm1']) @ layer['qkv'], 3, -1))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / (WIDTH // HEADS) ** 0.5
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), -1)
    mixed = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(BATCH, LENGTH, WIDTH)
    h = h + mixed @ layer['out']
    h = h + jax.nn.gelu(_rms_norm(h, layer['norm2']) @ layer['up']) @ layer['down']
  return _rms_norm(h, params['norm']) @ params['embed'].T


def main(_):
  if _ONE_ARENA.value:
    ctypes.CDLL('libc.so.6').mallopt(-8, 1)  # M_ARENA_MAX
  print(f'imports: peak RSS {_peak_mib():.0f} MiB', flush=True)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, _STEPS.value, 1e-4),
                   b2=0.99)

  @jax.jit
  def step(params, opt_state, tokens, targets):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        _logits(p, tokens), targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = jax.jit(_init)(jax.random.key(0))
  opt_state = jax.jit(tx.init)(params)
  print(f'initialised: peak RSS {_peak_mib():.0f} MiB', flush=True)
  with open(_DATA.value, 'rb') as f:
    data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  rng = np.random.default_rng(0)
  for i in range(_STEPS.value):
    starts = rng.integers(0, len(data) - LENGTH - 1, BATCH)
    window = np.stack([data[s:s + LENGTH + 1] for s in starts])
    params, opt_state, loss = step(params, opt_state, window[:, :-1], window[:, 1:])
    if i == 0:
      print(f'first step: peak RSS {_peak_mib():.0f} MiB', flush=True)
  print(f'{_STEPS.value} steps: loss {float(loss):.3f}, peak RSS {_peak_mib():.0f} MiB, '
        f'wall {time.time() - _START:.1f} s')


if __name__ == '__main__':
  app.run(main)
