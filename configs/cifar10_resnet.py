"""A ResNet-20-style network on CIFAR-10, with random flips and crops: configs/cifar10_cnn.py's
data (the binary files in `data.path`; a folder of images or TFDS with `data.source`)."""

from configs import cifar10_cnn
from configs import common
from configs import fashion_mnist_cnn


def get_config(presets: str = ''):
  config = common.build('classification', 'resnet')
  cifar10_cnn.use_cifar10(config)
  o = config.optim
  o.learning_rate, o.warmup_steps, o.final_lr_fraction = 2e-3, 400, 0.01
  o.adamw.weight_decay, o.adamw.b2 = 5e-4, 0.999
  config.train.steps = 39100  # 100 epochs of 50,000 at batch 128
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
