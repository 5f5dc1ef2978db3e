"""A small Vision Transformer (7x7 patches, 6 layers, width 128) on Fashion-MNIST."""

from configs import common


def get_config(presets: str = ''):
  config = common.image_config('vit', 'fashion_mnist')
  config.optim.learning_rate, config.optim.adamw.weight_decay = 1e-3, 0.05
  return common.apply_presets(config, presets, common.IMAGE_PRESETS, common.image_preset)
