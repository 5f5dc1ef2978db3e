"""The AOT planner (`train.py --compile_only --plan`) and the compiled-FLOP count it ranks by.

Needs libtpu, like tests/test_aot.py; one small scanned Llama planned once for a v5e-4 slice.
"""

import math

import pytest

from configs import default
from training import aot, plan
from tests.test_aot import needs_libtpu

_TOPOLOGY = 'v5e-4'  # 4 chips of 16 GiB


def _small():
  """A tiny Llama, scanned and fully rematerialised as the llama3_8b preset."""
  config = default.get_config('tiny,llama,fsdp')
  config.model.scan_layers, config.model.remat = True, 'full'
  return config


def _rows(printed: str) -> list[str]:
  return [line for line in printed.splitlines() if line.split()[0].isdigit()]


@pytest.fixture(scope='module')
def planned():
  config = _small()
  return config, plan.plan(config, _TOPOLOGY, max_compiles=2, remats=('none', 'full'))


@needs_libtpu
def test_less_recompute_ranks_above_full_remat(planned):
  config, candidates = planned
  best, second = candidates[:2]
  assert [c.overrides['model.remat'] for c in (best, second)] == ['none', 'full']
  assert best.fits and second.fits
  assert best.report.compiled_flops < second.report.compiled_flops
  # No recompute: the chip does about the model's FLOPs (which leave out the embedding lookup).
  assert 0.95 < best.report.compiled_flops / best.report.model_flops < 1.1
  assert 1.1 < second.report.compiled_flops / best.report.model_flops < 1.4
  printed = plan.format_plan(candidates, config, _TOPOLOGY)
  assert 'best: --config.model.remat=none' in printed
  assert [row.split()[-1] for row in _rows(printed)[:2]] == ['fits', 'fits']


@needs_libtpu
def test_printed_overrides_reproduce_the_chosen_compile(planned):
  config, candidates = planned
  flags = plan.format_plan(candidates, config, _TOPOLOGY).splitlines()[-1].split()[1:]
  for flag in flags:  # as --config.KEY=VALUE does on the command line
    key, value = flag.removeprefix('--config.').split('=')
    section, name = key.split('.')
    with config.unlocked():
      config[section][name] = type(config[section][name])(value)
  report = aot.compile_report(config, _TOPOLOGY)
  assert report.total_bytes == candidates[0].report.total_bytes
  assert report.compiled_flops == candidates[0].report.compiled_flops


@needs_libtpu
def test_compiled_flops_count_every_scanned_layer(planned):
  """XLA's own cost analysis counts a loop body once; the count must not depend on scanning."""
  _, candidates = planned
  config = plan.with_overrides(_small(), candidates[0].overrides)
  config.model.scan_layers = False
  unrolled = aot.compile_report(config, _TOPOLOGY).compiled_flops
  assert math.isclose(unrolled, candidates[0].report.compiled_flops, rel_tol=0.02)


@needs_libtpu
def test_a_candidate_that_cannot_fit_is_reported_as_such(capsys):
  config = _small()  # 5.7 B parameters: with AdamW, 17 GiB a chip even fully sharded
  m = config.model
  m.embed_dim, m.mlp_dim, m.num_layers, m.num_heads, m.num_kv_heads = 8192, 32768, 6, 64, 8
  assert plan.run(config, _TOPOLOGY, max_compiles=1) == 1
  out = capsys.readouterr().out.strip()
  assert out.splitlines()[-1] == 'no candidate fits'
  closest, *others = _rows(out)
  assert closest.endswith(' does not fit')  # the compiler's verdict, not the estimate's
  assert others and all(row.endswith(' does not fit (estimate)') for row in others)
