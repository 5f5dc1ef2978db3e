"""Ahead-of-time compile figures for TPU slices: `python benchmarks/aot_compile.py [--cases=...]`.

Compiles the real train step on this host for Cloud TPU slices (needs libtpu:
`pip install -e '.[tpu]'`) and prints, per case, training/aot.py's report: bytes per device by
category against HBM, FLOPs per step (analytic and compiled), compile time and peak host RSS.

Cases (one fresh process each, so each peak RSS is its own):
  8b_v5p128     llama3_8b preset (d 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256,
                sequence 8192, global batch 256) on v5p-128; target: >= 40% of HBM free.
  1b_v5e16      llama_1b preset (same batch) on v5e-16, 4 micro-batches of 4 sequences/device.
  1b_v6e8       llama_1b preset on v6e-8, 8 micro-batches of 4 sequences per device.
  scanned       a 32-layer Llama (d 512, 8 heads, MLP 1408, sequence 1024, batch 16) on v5e-8
  unscanned     with its layers scanned, and unrolled: what depth costs the compiler.
A case whose RSS passes --max_rss_gib is stopped (the machine is shared). The TPU compiler
uses the host's cores: the load average over each case is printed with it. Figures only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

from absl import app, flags

from configs import default as default_config
from hardware import console

_CASES = flags.DEFINE_list('cases', ['8b_v5p128', '1b_v5e16', '1b_v6e8', 'scanned', 'unscanned'],
                           'Cases to compile, one process each.')
_MAX_RSS_GIB = flags.DEFINE_float('max_rss_gib', 14.0, 'Stop a case whose RSS passes this.')
_CHILD = flags.DEFINE_bool('child', False, 'Compile the one case in --cases here (internal).')
_MIN_FREE = 0.40  # the target for the 8B model on v5p-128


def _depth_config(scan: bool):
  config = default_config.get_config('llama')
  m = config.model
  m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 512, 8, 8, 1408
  m.max_len = config.data.seq_len = 1024
  config.data.global_batch_size = 16
  m.scan_layers, m.remat = scan, 'full'
  config.mesh.data, config.mesh.fsdp = 1, -1
  return config


def _llama_1b(grad_accum_steps: int):
  # 256 x 8192 tokens in one go needs 23.6 GiB of temporaries per v5e chip (16 sequences each):
  # accumulating gradients over micro-batches keeps the global batch and cuts the activations.
  config = default_config.get_config('llama_1b')
  config.train.grad_accum_steps = grad_accum_steps
  return config


CASES = {  # name -> (config factory, topology, minimum free share of HBM)
    '8b_v5p128': (lambda: default_config.get_config('llama3_8b'), 'v5p-128', _MIN_FREE),
    '1b_v5e16': (lambda: _llama_1b(4), 'v5e-16', 0.0),
    '1b_v6e8': (lambda: _llama_1b(8), 'v6e-8', 0.0),
    'scanned': (lambda: _depth_config(scan=True), 'v5e-8', 0.0),
    'unscanned': (lambda: _depth_config(scan=False), 'v5e-8', 0.0),
}


def compile_case(name: str) -> int:
  from training import aot  # pylint: disable=g-import-not-at-top; after JAX_PLATFORMS is set
  make_config, topology, min_free = CASES[name]
  config = make_config()
  report = aot.compile_report(config, topology)
  print(f'[{name}]\n{aot.format_report(report, config)}')
  if not report.fits:
    print(f'  verdict     does NOT fit: {aot.shortfall(report)}', flush=True)
    return 1
  ok = report.free_fraction >= min_free
  print(f'  verdict     fits, {report.free_fraction:.1%} of HBM free'
        + (f' (target >= {min_free:.0%}: {"met" if ok else "MISSED"})' if min_free else ''),
        flush=True)
  return 0 if ok else 1


def _rss_bytes(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/statm', encoding='ascii') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, IndexError, ValueError):
    return 0


def _run_child(name: str) -> int:
  """Runs one case in a child process, stopping it if its RSS passes the limit."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child',
                            f'--cases={name}'], env=env)
  limit = _MAX_RSS_GIB.value * 2**30
  loads = []
  while child.poll() is None:
    if _rss_bytes(child.pid) > limit:
      child.kill()
      child.wait()
      print(f'[{name}] stopped: host RSS passed {_MAX_RSS_GIB.value:.1f} GiB', flush=True)
      return 1
    loads.append(os.getloadavg()[0])
    time.sleep(0.2)
  if loads:
    print(f'  machine     load average {sum(loads) / len(loads):.1f} on {os.cpu_count()} CPUs '
          'while compiling', flush=True)
  return child.returncode


def main(argv):
  del argv
  console.quiet_libraries(console.verbose())
  unknown = set(_CASES.value) - set(CASES)
  if unknown:
    raise app.UsageError(f'unknown cases {sorted(unknown)}; choose from {sorted(CASES)}')
  if _CHILD.value:
    sys.exit(compile_case(_CASES.value[0]))
  failed = [name for name in _CASES.value if _run_child(name) != 0]
  print(f'failed or missed target: {", ".join(failed)}' if failed else 'all cases fit')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  app.run(main)
