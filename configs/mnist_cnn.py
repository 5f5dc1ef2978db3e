"""The classic CNN on MNIST: configs/fashion_mnist_cnn.py pointed at MNIST.

MNIST from TFDS (`tfds build mnist` on a machine with internet, then
`--config.data.tfds_data_dir` if it is not in the default place), or from IDX files with
`--config.data.source=idx --config.data.path=DIR`.
"""

from configs import common
from configs import fashion_mnist_cnn


def get_config(presets: str = ''):
  config = fashion_mnist_cnn.base_config()
  d = config.data
  d.source, d.name, d.path = 'tfds', 'mnist', ''
  d.class_names = ()
  config.train.steps = 2345  # 5 epochs
  return common.apply_presets(config, presets, fashion_mnist_cnn.PRESETS,
                              fashion_mnist_cnn.apply_preset)
