"""Sections every experiment shares, and presets that combine in any order.

An experiment config (`configs/<name>.py`) is `build(task, model)` plus its own values: the
`task`, `model` and `data` sections come from the chosen task and model modules (so only their
keys exist, and an override of a key that does not apply is an error), the others from the code
that reads them (`training/config_check.py`, `training/health.py`, `parallel/sharding.py`).
"""

import ml_collections

from models import MODELS
from parallel import sharding
from tasks import TASKS
from training import config_check, health, optimizer


def build(task: str, model: str) -> ml_collections.ConfigDict:
  """Every section, with the task's and the model's own keys."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A run (workdir or checkpoint dir) whose parameters start this one; only those that exist
  # there with the same shape are loaded (no optimizer state, no step).
  config.init_from = ''
  config.task = TASKS[task].default_config()
  config.model = MODELS[model].default_config()
  config.data = TASKS[task].default_data_config()
  config.optim = optimizer.section()
  config.train = config_check.train_config()
  config.early_stop = config_check.early_stop_config()
  config.health = health.default_config()
  config.finetune = config_check.finetune_config()
  config.mesh = sharding.mesh_config()
  return config


def parallelism(config, preset) -> bool:
  """The parallelism presets every experiment offers; False if `preset` is not one."""
  mesh = config.mesh
  if preset == 'dp':
    mesh.data, mesh.fsdp, mesh.tensor = -1, 1, 1
  elif preset == 'fsdp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
  elif preset == 'fsdp_tp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 2
  elif preset == 'multislice':  # data parallel across slices, FSDP within each
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
    mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor = -1, 1, 1
  else:
    return False
  return True


PARALLELISM = ('dp', 'fsdp', 'fsdp_tp', 'multislice')


def apply_presets(config, presets: str, order: tuple[str, ...], apply_one):
  """Applies the comma-separated `presets` in the fixed `order` (so any order the user writes
  gives the same config); `apply_one(config, name)` applies one, parallelism ones come last."""
  names = [p for p in presets.split(',') if p]
  known = (*order, *PARALLELISM)
  for name in names:
    if name not in known:
      raise ValueError(f'unknown preset {name!r}; choose from {", ".join(known)}')
  for name in sorted(set(names), key=known.index):
    if not parallelism(config, name):
      apply_one(config, name)
  return config


# --- Shared presets and the image base config -------------------------------------------------

def tiny(config, global_batch_size: int = 16):
  """Every config's `tiny` preset: a short run (8 steps, evaluated and checkpointed at step 4)
  for tests and smoke checks."""
  config.train.update(steps=8, log_every=1, eval_every=4, checkpoint_every=4)
  config.optim.warmup_steps = 2
  config.data.global_batch_size = global_batch_size


def tiny_transformer(config):
  """`tiny` with a minimal transformer (2 layers, width 32, 4 heads) over 32 tokens, batch 8:
  the language model's and the encoder's `tiny`."""
  tiny(config, global_batch_size=8)
  m = config.model
  m.num_layers, m.num_heads, m.num_kv_heads, m.embed_dim, m.mlp_dim = 2, 4, 4, 32, 128
  m.max_len = config.data.seq_len = 32


IMAGE_PRESETS = ('tiny',)  # every image config's own presets, before the parallelism ones


def image_preset(config, preset):
  """`apply_presets`'s `apply_one` for the image configs (IMAGE_PRESETS)."""
  if preset == 'tiny':
    tiny(config)


FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')


def _fashion_mnist(config):
  """Debian's dataset-fashion-mnist IDX files; 28x28 grey; 60,000 training images."""
  config.model.image_shape = (28, 28, 1)
  d = config.data
  d.source, d.path = 'idx', '/usr/share/datasets/fashion-mnist'
  d.class_names = FASHION_MNIST_CLASSES
  o = config.optim
  o.learning_rate, o.warmup_steps, o.adamw.weight_decay = 2e-3, 100, 1e-4
  t = config.train
  t.steps = 4690  # 10 epochs of 60,000 at batch 128
  t.log_every, t.eval_every, t.checkpoint_every = 50, 469, 469  # evaluate once an epoch


def _mnist(config):
  """MNIST's IDX files (classes '0'..'9') in /usr/share/datasets/mnist, at Fashion-MNIST's
  recipe: the same shape and size."""
  _fashion_mnist(config)
  d = config.data
  d.path, d.class_names = '/usr/share/datasets/mnist', ()


def _cifar10(config):
  """CIFAR-10's binary files in /usr/share/datasets/cifar10 (class names from its
  batches.meta.txt), 32x32 colour images, flipped and cropped; 50,000 training images."""
  config.model.image_shape = (32, 32, 3)
  d = config.data
  d.source, d.path, d.augment = 'cifar_bin', '/usr/share/datasets/cifar10', 'flip,crop'
  o = config.optim
  o.warmup_steps, o.adamw.weight_decay = 400, 5e-4
  t = config.train
  t.log_every, t.eval_every, t.checkpoint_every = 100, 391, 391  # evaluate once an epoch


IMAGE_DATASETS = {'fashion_mnist': _fashion_mnist, 'mnist': _mnist, 'cifar10': _cifar10}


def image_config(model: str, dataset: str, task: str = 'classification'
                 ) -> ml_collections.ConfigDict:
  """The base of every image config: `model` on `dataset` (IMAGE_DATASETS) for `task`
  (classifying, unless another image task is named) in batches of 128 with AdamW (b2 0.999)
  and a cosine decay to 1% of the peak rate."""
  config = build(task, model)
  config.data.global_batch_size = 128
  o = config.optim
  o.schedule, o.final_lr_fraction, o.adamw.b2 = 'cosine', 0.01, 0.999
  IMAGE_DATASETS[dataset](config)
  return config
