"""The classic CIFAR-10 CNN: two blocks of a 3x3 convolution (32, then 64 filters), ReLU and a
2x2 max pool, a 512-unit dense layer, dropout 0.5 and a 10-way softmax (models/cnn.py; 2.1M
parameters), trained with random flips and crops.

`python train.py --config=configs/cifar10_cnn.py --workdir=DIR`. The data is CIFAR-10's binary
version (`cifar-10-binary.tar.gz`: `data_batch_1.bin`..`data_batch_5.bin`, `test_batch.bin`,
`batches.meta.txt`), in `data.path` or its `cifar-10-batches-bin/` subfolder; by default
/usr/share/datasets/cifar10, next to where Debian puts Fashion-MNIST, so
`tar xzf cifar-10-binary.tar.gz -C /usr/share/datasets/cifar10` needs no flag. Never the pickled
Python version: unpickling a downloaded file can run any code. Also a folder of images per class
(`--config.data.source=folder --config.data.path=DIR`) or TFDS
(`--config.data.source=tfds --config.data.name=cifar10`, after `tfds build cifar10`).
"""

from configs import common
from configs import fashion_mnist_cnn

CIFAR10_PATH = '/usr/share/datasets/cifar10'


def use_cifar10(config):
  """CIFAR-10's binary files in CIFAR10_PATH (class names from its batches.meta.txt), 32x32
  colour images, flipped and cropped, batch 128, and a 50,000-image epoch's schedule."""
  config.model.image_shape = (32, 32, 3)
  d = config.data
  d.source, d.name, d.path, d.augment = 'cifar_bin', 'cifar10', CIFAR10_PATH, 'flip,crop'
  d.global_batch_size = 128
  t = config.train
  t.log_every, t.eval_every, t.checkpoint_every = 100, 391, 391  # evaluate once an epoch


def get_config(presets: str = ''):
  config = common.build('classification', 'cnn')
  use_cifar10(config)
  m = config.model
  m.conv_features, m.kernel_size, m.dense_dim, m.dropout_rate = (32, 64), 3, 512, 0.5
  o = config.optim
  o.learning_rate, o.warmup_steps, o.final_lr_fraction = 1e-3, 400, 0.01
  o.adamw.weight_decay, o.adamw.b2 = 5e-4, 0.999
  config.train.steps = 19550  # 50 epochs of 50,000 at batch 128
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
