"""A small Vision Transformer (7x7 patches, 6 layers, width 128) on Fashion-MNIST."""

from configs import common
from configs import fashion_mnist_cnn


def get_config(presets: str = ''):
  config = fashion_mnist_cnn.base_config('vit')
  config.model.image_shape = (28, 28, 1)
  config.optim.learning_rate, config.optim.adamw.weight_decay = 1e-3, 0.05
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
