"""A ResNet-20-style network on CIFAR-10 (TFDS `cifar10`: `tfds build cifar10` on a machine with
internet; or a folder of images per class with `--config.data.source=folder
--config.data.path=DIR`), with random flips and crops."""

from configs import common
from configs import fashion_mnist_cnn


def get_config(presets: str = ''):
  config = common.build('classification', 'resnet')
  config.model.image_shape = (32, 32, 3)
  d = config.data
  d.source, d.name, d.path, d.augment = 'tfds', 'cifar10', '', 'flip,crop'
  d.global_batch_size = 128
  o = config.optim
  o.learning_rate, o.warmup_steps, o.final_lr_fraction = 2e-3, 400, 0.01
  o.adamw.weight_decay, o.adamw.b2 = 5e-4, 0.999
  t = config.train
  t.steps = 39100  # 100 epochs of 50,000 at batch 128
  t.log_every, t.eval_every, t.checkpoint_every = 100, 391, 391
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
