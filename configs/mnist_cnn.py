"""The classic CNN on MNIST: configs/fashion_mnist_cnn.py pointed at MNIST's IDX files.

`python train.py --config=configs/mnist_cnn.py --workdir=DIR`. The four IDX files
(`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`, plain or .gz) are read from `data.path`, by default
/usr/share/datasets/mnist: where Debian's `dataset-fashion-mnist` puts Fashion-MNIST, so copying
MNIST's files there (no Debian package ships them) needs no flag; elsewhere, set
`--config.data.path=DIR`. TFDS stays an option: `--config.data.source=tfds
--config.data.name=mnist` (`tfds build mnist` on a machine with internet, then
`--config.data.tfds_data_dir` if not in the default place).
"""

from configs import common


def get_config(presets: str = ''):
  config = common.image_config('cnn', 'mnist')
  config.train.steps = 2345  # 5 epochs
  return common.apply_presets(config, presets, common.IMAGE_PRESETS, common.image_preset)
