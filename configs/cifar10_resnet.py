"""A ResNet-20-style network on CIFAR-10, with random flips and crops: configs/cifar10_cnn.py's
data (the binary files in `data.path`; a folder of images or TFDS with `data.source`)."""

from configs import common


def get_config(presets: str = ''):
  config = common.image_config('resnet', 'cifar10')
  config.optim.learning_rate = 2e-3
  config.train.steps = 39100  # 100 epochs of 50,000 at batch 128
  return common.apply_presets(config, presets, common.IMAGE_PRESETS, common.image_preset)
