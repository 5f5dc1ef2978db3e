"""Pretrain a BERT-style byte-level encoder by masked-language modelling on the Python standard
library's source (or any text: `--config.data.source=files --config.data.files=GLOB`).

Then fine-tune it: configs/encoder_classify.py with `--config.init_from=<this run's workdir>`.
Presets: `tiny`, and the parallelism ones.
"""

from configs import common

PRESETS = ('tiny',)


def get_config(presets: str = ''):
  config = common.build('mlm', 'encoder')
  config.model.head = 'mlm'
  config.data.seq_len = config.model.max_len = 128
  config.data.global_batch_size = 32
  config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 100
  config.train.steps, config.train.eval_every, config.train.checkpoint_every = 2000, 250, 250
  return common.apply_presets(config, presets, PRESETS, apply_preset)


def apply_preset(config, preset):
  if preset == 'tiny':
    tiny_encoder(config)
    config.task.eval_batches = 1


def tiny_encoder(config):
  """A minimal encoder and a short run, for tests and smoke checks (shared with fine-tuning)."""
  m = config.model
  m.num_layers, m.num_heads, m.num_kv_heads, m.embed_dim, m.mlp_dim = 2, 4, 4, 32, 128
  m.max_len = config.data.seq_len = 32
  config.data.global_batch_size = 8
  config.train.update(steps=8, log_every=1, eval_every=4, checkpoint_every=4)
  config.optim.warmup_steps = 2
