"""Fine-tune the encoder of configs/encoder_mlm.py to classify a snippet of standard-library
source by its package (`stdlib_packages`: no download; data/text.py documents the split), or
any labelled text (`--config.data.source=csv|jsonl|tfds`).

`--config.init_from=<the MLM run's workdir>` loads its backbone (the classifier is new);
`--config.finetune.freeze_backbone=true` or `--config.finetune.backbone_lr_scale=0.1` hold it
back; `--config.finetune.lora_rank=8` trains LoRA adapters on it, frozen, instead. Without
init_from, the same encoder trains from scratch: the baseline.
"""

from configs import common
from data import text


def get_config(presets: str = ''):
  config = common.build('classification', 'encoder')
  m, d = config.model, config.data
  m.head, m.pool = 'classify', 'cls'
  m.num_classes = len(text.STDLIB_PACKAGES)
  d.source = 'stdlib_packages'
  d.seq_len = m.max_len = 128
  d.normalize = 'none'
  d.global_batch_size = 32
  config.optim.learning_rate, config.optim.warmup_steps = 5e-4, 50
  config.train.steps, config.train.eval_every, config.train.checkpoint_every = 1000, 250, 250
  return common.apply_presets(config, presets, ('tiny',),
                              lambda config, _: common.tiny_transformer(config))
