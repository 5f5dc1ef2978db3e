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
    common.tiny_transformer(config)
    config.task.eval_batches = 1
