"""XLA:CPU workarounds, kept in one place; TPU and GPU never take these paths.

Both are measured in `benchmarks/step_time.py`:
- XLA:CPU inserts a transpose of the activations before each dense layer's weight-gradient
  matmul when it sees `x.reshape(-1, d).T @ g`. Writing the weight gradient as one contraction
  over all batch dimensions lets it call the matmul kernel directly.
- glibc returns XLA's large temporary buffers to the kernel after every step and maps them again
  on the next, costing thousands of page faults per step; raising the thresholds keeps them.
"""

import ctypes
import ctypes.util
import functools

import jax
from jax import lax

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def tune_malloc() -> bool:
  """Stops glibc from unmapping freed buffers between steps. Returns whether it applied."""
  libc_name = ctypes.util.find_library('c')
  if jax.default_backend() != 'cpu' or not libc_name:
    return False
  libc = ctypes.CDLL(libc_name)
  if not hasattr(libc, 'mallopt'):  # not glibc
    return False
  # The mmap threshold caps at 32 MiB on 64-bit glibc; buffers above it are still mapped.
  return all([
      libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20),
      libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES),
      libc.mallopt(_M_TOP_PAD, 64 << 20),
  ])


@jax.custom_vjp
def _dense(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
  return _dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
  x, kernel = residuals
  batch_dims = tuple(range(x.ndim - 1))
  grad_x = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  grad_kernel = lax.dot_general(x, g, ((batch_dims, batch_dims), ((), ())))
  return grad_x, grad_kernel


_dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
  """`lax.dot_general` with the CPU-friendly weight gradient for plain `x @ kernel` layers."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  is_dense = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
              and rhs.ndim == 2 and batch == ((), ()))
  if not is_dense or precision or preferred_element_type or out_sharding:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)
  return _dense(lhs, rhs)


@functools.cache
def dense_dot_general():
  """The dot_general dense layers should use on the current default backend."""
  return dot_general if jax.default_backend() == 'cpu' else lax.dot_general
