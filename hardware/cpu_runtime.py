"""The XLA:CPU runtime set-up, kept in one place; TPU and GPU never take these paths.

Call `configure()` first thing in a program, before JAX initialises its backend. It routes
matmuls to XLA's own path (Eigen on oneDNN's sgemm, which reads transposed operands directly;
YNNPACK keeps reductions), turns off async dispatch, and tunes malloc. The CPU kernels that go
with it sit beside the layers that use them (`models/cpu_kernels.py`). Everything here is
measured by `benchmarks/step_time.py`.

Memory. XLA allocates each step's temporaries as one block (50 MiB for the small model); glibc
maps blocks that large afresh every step and unmaps them after, a page fault per 4 KiB (13K
faults, ~15 ms a step). `tune_malloc` keeps them on the heap. With synchronous dispatch a step's
block is freed before the next step allocates one, so steps reuse it instead of piling up
copies; trimming after each compile hands back the compiler's garbage.
"""

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os

import jax


# Matmuls through XLA's own path; YNNPACK still does reductions (faster than XLA's there).
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',)
# XLA's newer (MLIR) fusion emitters make ~5 ms/step faster kernels for the small model but hold
# ~130 MiB more while compiling; `configure(low_memory=True)` turns them off.
LOW_MEMORY_FLAGS = ('--xla_cpu_use_fusion_emitters=false',)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


def configure(low_memory: bool = False) -> bool:
  """Sets up the CPU backend. Call before JAX initialises it (its first `jax.devices()` or
  computation), e.g. first thing in `main`. The flags only affect XLA:CPU. Returns whether the
  malloc tuning applied (on CPU with glibc)."""
  if not _cpu_only():
    return False  # an accelerator's XLA may not know these flags; leave everything alone
  # libtpu installed for ahead-of-time compilation on a host without TPU chips: do not let JAX
  # try (and loudly fail) to start a TPU backend.
  jax.config.update('jax_platforms', jax.config.jax_platforms or 'cpu')
  flags = os.environ.get('XLA_FLAGS', '')
  wanted = XLA_CPU_FLAGS + (LOW_MEMORY_FLAGS if low_memory else ())
  extra = [f for f in wanted if f.split('=')[0] not in flags]  # the user's own flags win
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()
  # A step then returns when done, its temporaries already freed: the next step reuses them.
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return tune_malloc()


def _cpu_only() -> bool:
  """Whether JAX will run on the CPU, decided without initialising a backend."""
  platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  if importlib.util.find_spec('libtpu') and tpu_chips_present():
    return False
  plugins = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin')
  return not any(importlib.util.find_spec(p) for p in plugins)


@functools.cache  # find_library runs `ldconfig -p` in a subprocess: once, not after every compile
def _glibc():
  name = ctypes.util.find_library('c')
  libc = ctypes.CDLL(name) if name else None
  return libc if libc is not None and hasattr(libc, 'mallopt') and hasattr(
      libc, 'malloc_trim') else None


def tune_malloc() -> bool:
  """Keeps freed buffers on the heap for the next step. Returns whether it applied."""
  libc = _glibc()
  if libc is None or not _cpu_only():
    return False
  if jax.config.read('jax_cpu_enable_async_dispatch'):
    # Steps overlap, so their temporaries would pile up on the heap: only blocks up to the mmap
    # threshold's cap (32 MiB) stay; larger ones are still mapped afresh each step.
    keep_large = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
  else:
    keep_large = libc.mallopt(_M_MMAP_MAX, 0)  # every block comes from (and returns to) the heap
  ok = all([keep_large, libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30),  # freed memory stays mapped
            # No cap on malloc arenas (M_ARENA_MAX=1): it saves ~17 MiB on the char job but
            # adds ~280 MiB to the default job's peak (1,216-1,224 vs 935-950 MiB, 300 steps).
            libc.mallopt(_M_TOP_PAD, 64 << 20)])
  if ok and not getattr(tune_malloc, 'listening', False):
    jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)
    tune_malloc.listening = True
  return ok


def _trim_after_compile(event, duration_secs, **kwargs):
  """Hands back what the compiler freed, which the trim threshold above would otherwise keep."""
  del duration_secs, kwargs
  if event == '/jax/core/compile/backend_compile_duration':
    _glibc().malloc_trim(0)


def tpu_chips_present() -> bool:
  """A TPU VM: its chips appear as /dev/accel* (v2-v4, v6e) or under /dev/vfio (v5e, v5p)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))
