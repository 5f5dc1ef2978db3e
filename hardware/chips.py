"""What one accelerator chip can do: peak dense bf16 FLOP/s, HBM and (TPUs) inter-chip
bandwidth, looked up by device kind.

These are the denominators of MFU (model FLOP/s utilisation), of the ahead-of-time memory
check and of the planner's step-time estimate. Figures are the vendors' own, per chip, dense
(no structured sparsity); ICI is the bidirectional inter-chip interconnect bandwidth:

  TPU v4         275 TFLOP/s   32 GiB HBM2    300 GB/s ICI  cloud.google.com/tpu/docs/v4 (ICI:
                                                            the v4 paper, six 50 GB/s links)
  TPU v5e        197 TFLOP/s   16 GiB HBM2    400 GB/s ICI  cloud.google.com/tpu/docs/v5e
  TPU v5p        459 TFLOP/s   95 GiB HBM2e  1200 GB/s ICI  cloud.google.com/tpu/docs/v5p
  TPU v6e        918 TFLOP/s   32 GiB HBM     800 GB/s ICI  cloud.google.com/tpu/docs/v6e
  A100 SXM/PCIe  312 TFLOP/s   40 or 80 GB    NVIDIA A100 datasheet (624 is with sparsity)
  H100 SXM       989 TFLOP/s   80 GB          NVIDIA H100 datasheet (1,979 is with sparsity)
  H100 PCIe      756 TFLOP/s   80 GB          same datasheet (1,513 with sparsity)
  H100 NVL       835 TFLOP/s   94 GB          same datasheet (1,671 with sparsity)
  H200 SXM       989 TFLOP/s   141 GB         NVIDIA H200 datasheet (1,979 with sparsity)
  H200 NVL       835 TFLOP/s   141 GB         same datasheet (1,671 with sparsity)

JAX shows each of these chips as one device (v4 and v5p run their two TensorCores as one
"megacore" device), so per chip is per device. On CPU the peak is this machine's measured
float32 matmul rate, shared among the process's CPU devices.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: int
  ici_bytes_per_second: float = float('nan')  # bidirectional, per chip (TPUs)


_TPUS = {  # device_kind as JAX reports it (both spellings seen across libtpu releases)
    'TPU v4': Chip('TPU v4', 275e12, 32 * GIB, 300e9),
    'TPU v5 lite': Chip('TPU v5e', 197e12, 16 * GIB, 400e9),
    'TPU v5e': Chip('TPU v5e', 197e12, 16 * GIB, 400e9),
    'TPU v5': Chip('TPU v5p', 459e12, 95 * GIB, 1200e9),
    'TPU v5p': Chip('TPU v5p', 459e12, 95 * GIB, 1200e9),
    'TPU v6 lite': Chip('TPU v6e', 918e12, 32 * GIB, 800e9),
    'TPU v6e': Chip('TPU v6e', 918e12, 32 * GIB, 800e9),
}

# NVIDIA device kinds name the board, e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB';
# the first pattern contained in the kind wins, so variants come before their family.
_GPUS = (
    ('A100-SXM4-40GB', Chip('A100 40GB', 312e12, 40 * GIB)),
    ('A100-PCIE-40GB', Chip('A100 40GB', 312e12, 40 * GIB)),
    ('A100', Chip('A100 80GB', 312e12, 80 * GIB)),
    ('H100 PCIe', Chip('H100 PCIe', 756e12, 80 * 10**9)),
    ('H100 NVL', Chip('H100 NVL', 835e12, 94 * 10**9)),
    ('H100', Chip('H100 SXM', 989e12, 80 * 10**9)),
    ('H200 NVL', Chip('H200 NVL', 835e12, 141 * 10**9)),
    ('H200', Chip('H200 SXM', 989e12, 141 * 10**9)),
)


def chip_for(device_kind: str) -> Chip | None:
  """The table's entry for a `jax.Device.device_kind`, or None for a chip it lacks."""
  if device_kind in _TPUS:
    return _TPUS[device_kind]
  return next((chip for pattern, chip in _GPUS if pattern in device_kind), None)


def matmul_flops_per_second(n: int = 2048, repeats: int = 20) -> float:
  """This machine's float32 rate on a jitted n x n x n `jnp.dot` on the default device, the best
  of `repeats` (other load on a shared machine only ever slows it)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


@functools.cache
def _cpu_flops_per_device() -> float:
  # 1024^3 products take well under a second in all, and rate within ~10% of the 2048^3 ones
  # (step-time benchmark). The CPU devices of one process (as forced by
  # --xla_force_host_platform_device_count) share its cores.
  return matmul_flops_per_second(n=1024, repeats=10) / len(jax.local_devices(backend='cpu'))


def peak_flops_per_device(device: jax.Device) -> float:
  """Peak FLOP/s of one device: the table's dense bf16 figure, or on CPU the measured float32
  matmul rate (once per process) split over the CPU devices. NaN for a chip the table lacks,
  so an MFU computed from it is NaN rather than a guess."""
  if device.platform == 'cpu':
    return _cpu_flops_per_device()
  chip = chip_for(device.device_kind)
  return chip.peak_flops if chip else float('nan')


def hbm_bytes_per_device(device: jax.Device) -> int | None:
  """Nominal memory of one device from the table (None for CPU and unknown chips)."""
  chip = None if device.platform == 'cpu' else chip_for(device.device_kind)
  return chip.hbm_bytes if chip else None
