"""Ahead-of-time compilation for TPU slices, chip figures and the analytic FLOP count.

The compile tests need libtpu (`pip install -e '.[tpu]'`, which CI installs) and are skipped
without it; they compile tiny models, a few seconds each.
"""

import importlib.util
import os
import subprocess
import sys
import types

import jax
import pytest
from flax import nnx

from configs import default
from models import MODELS, flops
from hardware import chips, tpu_slices
from training import aot
from tests.conftest import REPO
from training.config_check import ConfigError

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]'")


def _tiny(presets='tiny,llama,fsdp'):
  config = default.get_config(presets)
  assert config.model.dtype == 'auto'  # resolved for the TPU, not for this CPU host
  return config


# --- analytic FLOPs -------------------------------------------------------------------------

def test_train_flops_per_token_matches_a_hand_count():
  m = default.get_config('tiny').model  # d 32, 4 heads of 8, 2 layers, GELU MLP 128, vocab 256
  # Per layer: q, k, v, out 4 * 32 * 32 = 4096; up, down 2 * 32 * 128 = 8192. Unembed 32 * 256.
  assert flops.matmul_params(m) == 2 * (4096 + 8192) + 8192
  # Causal attention over 64 positions: 6 * layers * T * heads * head_dim.
  assert flops.attention_flops_per_token(m, 64) == 6 * 2 * 64 * 4 * 8
  assert flops.train_flops_per_token(m, 64) == 6 * 32768 + 24576


def test_grouped_query_swiglu_count_matches_the_models_kernels():
  config = default.get_config('tiny,llama')  # 2 kv heads, SwiGLU, untied unembedding
  model = MODELS['transformer'].Model(config.model, rngs=nnx.Rngs(params=0))
  kernels = sum(x.size for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
                if path[-1] == 'kernel')
  assert config.model.num_kv_heads < config.model.num_heads and not config.model.tie_embeddings
  assert flops.matmul_params(config.model) == kernels


# --- chips and slice names ------------------------------------------------------------------

def test_chip_table_by_device_kind():
  assert chips.chip_for('TPU v5 lite') == chips.chip_for('TPU v5e')
  assert chips.chip_for('TPU v5 lite').peak_flops == 197e12
  assert chips.chip_for('TPU v5').hbm_bytes == 95 * 2**30  # v5p
  assert chips.chip_for('TPU v6 lite').peak_flops == 918e12
  assert chips.chip_for('NVIDIA H100 80GB HBM3').peak_flops == 989e12
  assert chips.chip_for('NVIDIA H100 PCIe').peak_flops == 756e12
  assert chips.chip_for('NVIDIA A100-SXM4-40GB').hbm_bytes == 40 * 2**30
  assert chips.chip_for('NVIDIA H200').hbm_bytes == 141 * 10**9
  assert chips.chip_for('TPU v99') is None
  unknown = types.SimpleNamespace(platform='gpu', device_kind='Some Future GPU')
  assert jax.numpy.isnan(chips.peak_flops_per_device(unknown))
  assert chips.hbm_bytes_per_device(jax.devices()[0]) is None  # CPU


def test_cpu_peak_is_the_measured_matmul_rate_shared_by_the_cpu_devices():
  assert chips.matmul_flops_per_second(n=128, repeats=2) > 1e6
  per_device = chips.peak_flops_per_device(jax.devices()[0])
  assert 1e6 < per_device < float('inf')
  assert chips.peak_flops_per_device(jax.devices()[-1]) == per_device  # measured once


def test_slice_names_map_to_physical_layouts():
  cases = {'v5p-128': ('v5p:4x4x4', 64, 1), 'v4-32': ('v4:2x2x4', 16, 1),
           'v5litepod-16': ('v5e:4x4', 16, 1), 'v5e-8': ('v5e:2x4', 8, 1),
           'v6e-8': ('v6e:2x4', 8, 1), '2xv5e-16': ('v5e:4x4', 16, 2)}
  for name, (topology, chip_count, slices) in cases.items():
    parsed = tpu_slices.parse(name)
    assert (parsed.topology, parsed.chips, parsed.num_slices) == (topology, chip_count, slices)


@pytest.mark.parametrize('name', ['v5p-2', 'v5e-3', 'v7x-8', 'tpu', '0xv5e-4'])
def test_unknown_slice_names_list_the_supported_ones(name):
  with pytest.raises(ValueError, match=r'unknown TPU topology .*supported: v4-\{8,'):
    tpu_slices.parse(name)


@needs_libtpu
def test_slice_devices_are_the_tables_chips():
  for name, count, chip in [('v4-16', 8, 'TPU v4'), ('v5p-128', 64, 'TPU v5p'),
                            ('v5e-16', 16, 'TPU v5e'), ('v6e-8', 8, 'TPU v6e'),
                            ('2xv6e-4', 8, 'TPU v6e')]:
    devices = tpu_slices.devices(name)
    assert len(devices) == count, name
    assert chips.chip_for(devices[0].device_kind).name == chip, devices[0].device_kind


# --- compiling the train step ---------------------------------------------------------------

def _expected_params_bytes_per_device(config, ways):
  """Float32 parameters: norm scales are replicated, everything else split `ways` ways."""
  m = config.model
  norms = (2 * m.num_layers + 1) * m.embed_dim
  total = flops.matmul_params(m) + m.vocab_size * m.embed_dim + norms  # + the embedding table
  return 4 * ((total - norms) // ways + norms)


@needs_libtpu
@pytest.mark.parametrize('topology', ['v5e-4', 'v6e-8'])
def test_small_model_compiles_for_a_tpu_slice(topology):
  config = _tiny()
  report = aot.compile_report(config, topology)
  devices = len(tpu_slices.devices(topology))
  assert report.mesh == {'stage': 1, 'data': 1, 'fsdp': devices, 'tensor': 1}
  assert report.params_bytes == _expected_params_bytes_per_device(config, devices)
  # AdamW's two moments per parameter, plus scalar step counts.
  assert 0 <= report.opt_state_bytes - 2 * report.params_bytes < 64
  assert 0 < report.temp_bytes < report.total_bytes < report.hbm_bytes
  assert report.fits and report.free_fraction > 0.99
  model = MODELS[config.model.name]
  assert report.model_flops == aot.train_flops_per_step(config, model) / devices
  assert report.compiled_flops > 0
  printed = aot.format_report(report, config)
  assert f'{topology}: {devices} x TPU v' in printed and 'free)' in printed


@needs_libtpu
def test_multislice_mesh_spans_the_slices(capsys):
  assert aot.run(_tiny('tiny,llama,multislice'), '2xv5e-4') == 0
  assert '2xv5e-4: 8 x TPU v5 lite (16 GiB HBM each), mesh stage=1 data=2 fsdp=4 tensor=1' in (
      capsys.readouterr().out)


def _oversized():
  config = _tiny('tiny,llama,dp')  # replicated: 2 B parameters + AdamW on every 16 GiB chip
  config.model.embed_dim, config.model.mlp_dim = 8192, 32768
  return config


@needs_libtpu
def test_oversized_model_is_reported_as_not_fitting(capsys):
  assert aot.run(_oversized(), 'v5e-4') == 1
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith('error: the train step does not fit v5e-4 (16 GiB HBM per TPU v5 lite)')
  assert 'parameters and optimizer state take 22.55 GiB per device' in error


@needs_libtpu
def test_config_problems_are_config_errors():
  with pytest.raises(ConfigError, match='unknown TPU topology'):
    aot.run(_tiny(), 'v5e-3')
  config = _tiny('tiny,llama')
  config.mesh.data = 3
  with pytest.raises(ConfigError, match='do not divide the 8 devices'):
    aot.run(config, 'v6e-8')


@needs_libtpu
def test_switching_optimizer_on_the_command_line_compiles():
  """A config file that tunes adamw, with --config.optim.name=sgd given: the file's adamw keys
  are tolerated because the name was overridden, as in a training run; unless it was not."""
  config = _tiny()
  config.optim.adamw.b2 = 0.999  # as configs/fashion_mnist_cnn.py tunes it
  config.optim.name = 'sgd'
  with pytest.raises(ConfigError, match='optim.adamw.b2'):
    aot.run(config, 'v5e-4')
  assert aot.run(config, 'v5e-4', overridden={'optim.name'}) == 0


def test_missing_libtpu_says_how_to_install(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else find_spec(name, *a))
  with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    aot.run(_tiny(), 'v5e-4')


def _train(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


@needs_libtpu
def test_compile_only_command_exit_statuses():
  model = ['--config=configs/default.py:tiny,llama,dp']
  too_big = _train('--compile_only', '--topology=v5e-4', *model, '--config.model.embed_dim=8192',
                   '--config.model.mlp_dim=32768')
  assert too_big.returncode == 1, too_big.stderr
  assert 'does not fit v5e-4' in too_big.stderr.strip().splitlines()[-1]
  unknown = _train('--compile_only', '--topology=v5e-3', *model)
  assert unknown.returncode == 2, unknown.stderr
  assert 'unknown TPU topology' in unknown.stderr.strip().splitlines()[-1]
