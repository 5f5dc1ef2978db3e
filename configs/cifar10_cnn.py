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


def get_config(presets: str = ''):
  config = common.image_config('cnn', 'cifar10')
  m = config.model
  m.conv_features, m.kernel_size, m.dense_dim, m.dropout_rate = (32, 64), 3, 512, 0.5
  config.optim.learning_rate = 1e-3
  config.train.steps = 19550  # 50 epochs of 50,000 at batch 128
  return common.apply_presets(config, presets, common.IMAGE_PRESETS, common.image_preset)
