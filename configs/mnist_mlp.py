"""The classic multilayer perceptron on MNIST: 784 pixels, two dense layers of 512 with ReLU and
dropout 0.2, a 10-way softmax (models/mlp.py; 670K parameters).

`python train.py --config=configs/mnist_mlp.py --workdir=DIR`. The data is MNIST's IDX files in
`data.path`, by default /usr/share/datasets/mnist (configs/mnist_cnn.py says why); any
MNIST-format set works the same way, e.g. Fashion-MNIST with
`--config.data.path=/usr/share/datasets/fashion-mnist`. Presets: `tiny` (a short smoke run) and
the parallelism ones (`dp`, `fsdp`, `fsdp_tp`).
"""

from configs import common


def get_config(presets: str = ''):
  config = common.image_config('mlp', 'mnist')
  config.optim.learning_rate = 1e-3
  config.train.steps = 4690  # 10 epochs of 60,000 at batch 128
  return common.apply_presets(config, presets, common.IMAGE_PRESETS, common.image_preset)
