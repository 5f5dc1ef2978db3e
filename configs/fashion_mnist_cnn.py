"""The classic CNN on Fashion-MNIST (60k/10k 28x28 grey images, 10 classes).

`python train.py --config=configs/fashion_mnist_cnn.py --workdir=DIR`. The data is read from
Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`: IDX files in
/usr/share/datasets/fashion-mnist/), or from TFDS with
`--config.data.source=tfds --config.data.name=fashion_mnist` once it is prepared there.
Presets: `tiny` (a short smoke run) and the parallelism ones (`dp`, `fsdp`, `fsdp_tp`).
No augmentation by default; `--config.data.augment=flip,crop,jitter,mixup,cutmix` (any of them)
and `--config.data.balance=reweight|oversample` apply to any image config (data/augment.py,
data/classification.py).
"""

from configs import common


def get_config(presets: str = ''):
  return common.apply_presets(common.image_config('cnn', 'fashion_mnist'), presets,
                              common.IMAGE_PRESETS, common.image_preset)
