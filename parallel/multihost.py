"""Joining a multi-process run: one process per host on a TPU pod, or several on one machine.

On Cloud TPU, `jax.distributed.initialize()` finds the other hosts from the TPU metadata. Anywhere
else the coordinator's address, the process count and this process's id come from flags; CPU
processes then exchange collectives over gloo (TCP).
"""

import jax

from hardware import cpu_runtime


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1):
  """Joins the run described by the arguments, or the TPU pod this host belongs to, if any."""
  if coordinator_address:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes})')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used only on CPU
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif num_processes > 1:
    raise ValueError('--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0')
  elif cpu_runtime.tpu_chips_present():
    jax.distributed.initialize()

