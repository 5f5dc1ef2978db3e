"""The configs the benchmarks time and check, by name."""

from configs import default as default_config


def small_config():
  """A char-level GPT-2: 4 layers, 4 heads, 128 wide (MLP 512), vocab 65, sequence 64,
  batch 12, AdamW in float32, dropout 0. Built directly, so vocab 65 needs no byte pipeline."""
  config = default_config.get_config()
  m = config.model
  m.vocab_size, m.num_layers, m.num_heads, m.num_kv_heads = 65, 4, 4, 4
  m.embed_dim, m.mlp_dim, m.max_len, m.dropout_rate = 128, 512, 64, 0.0
  config.data.seq_len, config.data.global_batch_size = 64, 12
  return config


def _with_health(config):
  config.health.every = 1  # the per-layer norms are computed every step whenever health is on
  return config


CONFIGS = {
    'default': default_config.get_config,  # configs/default.py, no presets
    'small': small_config,
    'llama': lambda: default_config.get_config('llama'),
    'default_health': lambda: _with_health(default_config.get_config()),  # health every step
}
