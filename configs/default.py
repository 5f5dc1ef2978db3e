"""Default job: a byte-level GPT trained on the Python standard library's own source.

Usage: `python train.py --config=configs/default.py[:preset,preset...] --config.<key>=<value>`.
Presets (comma-separated; any order gives the same config):
  gpt2 | llama          model style (gpt2 is the default)
  dp | fsdp | fsdp_tp   parallelism within a slice: data, fully sharded, fully sharded x tensor
  llama3_8b | llama_1b  Llama 3 8B and Llama 3.2 1B shapes (sequence 8192, batch 256),
                        scanned, remat, FSDP
  multislice            data parallel across slices (DCN), FSDP within each slice (ICI)
  tiny                  a minimal model and short run, for tests and smoke checks
Every key is declared here; the config is locked, so a misspelt override is an error.
"""

from configs import common

# Applied in this order, whatever order they are named in; parallelism presets come last.
PRESETS = ('tiny', 'gpt2', 'llama', 'llama3_8b', 'llama_1b')


def apply_preset(config, preset):
  m = config.model
  if preset == 'gpt2':
    pass  # the defaults
  elif preset == 'llama':
    m.position, m.norm, m.mlp = 'rope', 'rmsnorm', 'swiglu'
    m.use_bias, m.tie_embeddings = False, False
    m.num_kv_heads = max(1, m.num_heads // 2)
    # SwiGLU has three matrices: 8/3 of the width keeps a 4x GELU MLP's parameter count.
    m.mlp_dim = 32 * round(8 * m.embed_dim / 3 / 32)
  elif preset in ('llama3_8b', 'llama_1b'):
    _llama_size(config, preset)
  elif preset == 'tiny':
    common.tiny_transformer(config)
    config.task.update(eval_batches=1, num_samples=1, sample_length=16)


def _llama_size(config, preset):
  """Llama 3 shapes for pod runs and ahead-of-time compilation: scanned and rematerialised."""
  apply_preset(config, 'llama')  # its width-derived MLP size is then replaced
  m = config.model
  if preset == 'llama3_8b':
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 4096, 32, 8, 14336
  else:  # Llama 3.2 1B: its Hugging Face checkpoint loads into this shape
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 16, 2048, 32, 8, 8192
    m.tie_embeddings = True
    m.rope_scaling, m.rope_factor, m.rope_low_freq_factor, m.rope_high_freq_factor = (
        'llama3', 32.0, 1.0, 4.0)
    m.rope_original_max_len = 8192
  m.vocab_size, m.rope_theta = 128256, 500000.0
  m.max_len = config.data.seq_len = 8192
  config.data.global_batch_size = 256
  m.scan_layers, m.remat, m.loss_chunk = True, 'full', 1024
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1


def get_config(presets: str = ''):
  return common.apply_presets(common.build('lm', 'transformer'), presets, PRESETS, apply_preset)
