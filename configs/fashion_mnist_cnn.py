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

PRESETS = ('tiny',)


def base_config(model: str = 'cnn'):
  config = common.build('classification', model)
  config.model.image_shape = (28, 28, 1)
  d = config.data
  d.source, d.name, d.path = 'idx', 'fashion_mnist', '/usr/share/datasets/fashion-mnist'
  d.class_names = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                   'Sneaker', 'Bag', 'Ankle boot')
  d.global_batch_size = 128
  o = config.optim
  o.learning_rate, o.warmup_steps, o.schedule, o.final_lr_fraction = 2e-3, 100, 'cosine', 0.01
  o.adamw.weight_decay, o.adamw.b2 = 1e-4, 0.999
  t = config.train
  t.steps = 4690  # 10 epochs of 60,000 at batch 128
  t.log_every, t.eval_every, t.checkpoint_every = 50, 469, 469  # evaluate once an epoch
  return config


def apply_preset(config, preset):
  if preset == 'tiny':
    config.train.update(steps=8, log_every=1, eval_every=4, checkpoint_every=4)
    config.optim.warmup_steps = 2
    config.data.global_batch_size = 16


def get_config(presets: str = ''):
  return common.apply_presets(base_config(), presets, PRESETS, apply_preset)
