"""A small ResNet (BatchNorm, 3 stages) on Fashion-MNIST: configs/fashion_mnist_cnn.py's data."""

from configs import common
from configs import fashion_mnist_cnn


def get_config(presets: str = ''):
  config = fashion_mnist_cnn.base_config('resnet')
  config.model.image_shape = (28, 28, 1)
  config.model.stage_sizes, config.model.width = (2, 2, 2), 16
  config.data.augment = 'none'
  config.optim.adamw.weight_decay = 5e-4
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
