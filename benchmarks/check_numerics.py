"""Checks that the CPU paths in `models/cpu_kernels.py` leave the model's math unchanged.

`python benchmarks/check_numerics.py [--configs=small,default,llama]` computes the loss and
gradients of one batch twice, with the CPU paths on and off (off is what TPU/GPU run: plain
`lax.dot_general` dense layers, `jax.nn.dot_product_attention`, `Embed.attend`), and prints the
largest differences. Exits 1 if any exceeds the tolerance.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hardware import cpu_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_runtime.configure()  # the XLA:CPU setup the benchmarks and training run with

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.bench_configs import CONFIGS
from parallel import sharding
from tasks import language_model
from training import state as state_lib

_CONFIGS = flags.DEFINE_list('configs', ['small', 'default', 'llama'], 'Configs to check.')
_TOLERANCE = flags.DEFINE_float('tolerance', 1e-5, 'Largest allowed difference, relative to '
                                'the largest magnitude of the same array.')


def loss_and_grads(config, cpu_paths: bool):
  """Loss and gradients on one fixed batch, in float32, with the model built for the CPU (its
  workarounds) or as an accelerator runs it in float32 (plain dot_general, XLA attention)."""
  config.model.dtype = 'float32'
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  setup = state_lib.make_setup(config, mesh, platform='cpu' if cpu_paths else 'gpu')
  tokens = np.random.default_rng(0).integers(
      0, config.model.vocab_size, (config.data.global_batch_size, config.data.seq_len + 1))
  with sharding.activate(mesh, config.mesh.rules):
    params = state_lib.init_state(config, setup)['params']
    loss_fn = lambda p: language_model.next_token_loss(setup.model(p), jnp.asarray(tokens))
    return jax.jit(jax.value_and_grad(loss_fn))(params)


def main(argv):
  del argv
  ok = True
  for name in _CONFIGS.value:
    (loss, grads), (ref_loss, ref_grads) = (loss_and_grads(CONFIGS[name](), on)
                                            for on in (True, False))
    worst, worst_path = 0.0, ''
    # Each gradient is compared relative to its own largest magnitude, floored at 1e-3 of the
    # largest of all: some are zero up to rounding (the key bias: softmax ignores it).
    floor = 1e-3 * max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      diff = float(jnp.max(jnp.abs(g - r))) / max(float(jnp.max(jnp.abs(r))), floor)
      if diff > worst:
        worst, worst_path = diff, jax.tree_util.keystr(path)
    loss_diff = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    ok &= max(worst, loss_diff) <= _TOLERANCE.value
    print(f'[{name}] loss {float(loss):.7f} vs {float(ref_loss):.7f} (rel diff {loss_diff:.1e}); '
          f'largest gradient diff {worst:.1e} (relative) at {worst_path}')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main)
