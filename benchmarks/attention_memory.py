"""Compiles one attention layer's forward and backward pass for a TPU slice from this host and
prints each kernel's per-device temporaries, or the compiler's error (needs libtpu, no TPU):

  python benchmarks/attention_memory.py [--topology=v5e-4] [--lengths=2048,8192]

Llama-3-8B attention shapes (32 query heads, 8 kv heads, head dim 128, bfloat16), batch split
over every device (FSDP), `--per_device_batch` sequences on each. Prints figures only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only TPU devices; never start a TPU

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from absl import app, flags

from configs import default
from models import attention
from hardware import tpu_slices
from parallel import sharding

_TOPOLOGY = flags.DEFINE_string('topology', 'v5e-4', 'Cloud TPU slice name.')
_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192'], 'Sequence lengths.')
_KERNELS = flags.DEFINE_list('kernels', ['xla', 'splash'], 'Attention kernels to compile.')
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 1, 'Sequences per device.')
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _compile(kind, length, mesh, rules):
  """Per-device temporary bytes of the compiled forward+backward, or the error's first line."""
  spec = sharding.logical_sharding(mesh, rules, 'batch', 'length', 'heads', 'kv')
  batch = _PER_DEVICE_BATCH.value * mesh.devices.size
  q = jax.ShapeDtypeStruct((batch, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)
  kv = jax.ShapeDtypeStruct((batch, length, KV_HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)

  def forward_and_backward(q, k, v):
    out, vjp_fn = jax.vjp(lambda *qkv: attention.attention(kind, *qkv), q, k, v)
    return vjp_fn(out)

  with sharding.activate(mesh, rules):
    lowered = jax.jit(forward_and_backward).lower(q, kv, kv)
  try:
    return lowered.compile().memory_analysis().temp_size_in_bytes
  except jax.errors.JaxRuntimeError as e:
    return str(e).strip().splitlines()[0]


def main(argv):
  del argv
  config = default.get_config('fsdp')
  devices = tpu_slices.devices(_TOPOLOGY.value)
  mesh = sharding.make_mesh(config.mesh, devices)
  print(f'{_TOPOLOGY.value} ({devices[0].device_kind}), mesh {dict(mesh.shape)}, '
        f'{_PER_DEVICE_BATCH.value} sequence(s) per device, {HEADS}/{KV_HEADS} heads x '
        f'{HEAD_DIM}, bfloat16, forward+backward')
  for length in map(int, _LENGTHS.value):
    for kind in _KERNELS.value:
      result = _compile(kind, length, mesh, config.mesh.rules)
      shown = f'{result / 2**30:8.2f} GiB temporaries' if isinstance(result, int) else result
      print(f'  L={length:6d} {kind:7s} {shown}')


if __name__ == '__main__':
  app.run(main)
