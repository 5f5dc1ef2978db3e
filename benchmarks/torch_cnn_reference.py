"""The Fashion-MNIST CNN in PyTorch, timed per training step: a parity figure for this machine.

`python benchmarks/torch_cnn_reference.py [--batch=128] [--steps=100] [--warmup=10]
[--channels_last] [--compile]` needs PyTorch (a CPU build, e.g. `pip install torch`); it is not a
project dependency. Prints figures only: median ms per step, examples/s and peak RSS.

The model is models/cnn.py with its default config (configs/fashion_mnist_cnn.py): 28x28x1
images -> 3x3 'SAME' conv 32 -> ReLU -> 2x2 max pool -> 3x3 'SAME' conv 64 -> ReLU -> 2x2 max
pool -> flatten (7x7x64) -> dense 256 -> ReLU -> dropout 0.3 -> dense 10, 824,458 parameters,
initialised the same way (He-uniform kernels, LeCun-uniform head, zero biases). A step is
forward, softmax cross-entropy, backward, clipping the gradient's global norm at 1, and AdamW
(betas 0.9/0.999, eps 1e-8, weight decay 1e-4 on conv and dense kernels only, not biases), in
float32 eager on all cores, on random N(0, 1) images and labels made before timing. The learning
rate is constant (podium's warmup-cosine schedule costs nothing measurable). `--channels_last`
keeps activations NHWC (podium's layout); `--compile` times torch.compile (its first steps
compile and are not timed).

CPU speed here drifts by a quarter from hour to hour (shared hosts), so compare within the same
hour with the images/s podium logs for the same model, batch and cores:

  python benchmarks/classifier_accuracy.py --configs=fashion_mnist_cnn --steps=300 \
      --extra=--config.train.eval_every=0

which runs `python train.py --config=configs/fashion_mnist_cnn.py --workdir=...
--config.train.steps=300 --config.train.eval_every=0` and prints the median images_per_second
over its logged steps (every 50th; the first, which includes compiling, left out). That figure
is the whole loop's: podium's input pipeline (real Fashion-MNIST) and host work between steps
count in it, while this script times the step alone.

`--train_steps=4690` instead trains the whole job the way `python train.py
--config=configs/fashion_mnist_cnn.py` does, as one process for benchmarks/whole_run.py
--vs_reference: real Fashion-MNIST from --data (IDX files), normalised by the train split's mean
and standard deviation, 10% of the train split held out for validation, shuffled each epoch,
batch 128, learning rate warmed up over 100 steps to 2e-3 then cosine to 1% of it, validation
accuracy and a checkpoint (torch.save) every --eval_every steps, the test split once at the end.
"""

import gzip
import math
import os
import sys
import tempfile

import numpy as np
import torch
from absl import app, flags
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import torch_reference  # pylint: disable=wrong-import-position

_BATCH = flags.DEFINE_integer('batch', 128, 'Examples per step.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 0, 'Train the whole job for this many steps '
                                    '(0: time steps on random data instead).')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 469, 'Steps between validations (--train_steps).')
_DATA = flags.DEFINE_string('data', '/usr/share/datasets/fashion-mnist', 'The IDX files.')
_CHANNELS_LAST = flags.DEFINE_bool('channels_last', False, "NHWC activations (podium's layout) "
                                   "instead of PyTorch's default NCHW.")

HEIGHT, WIDTH, CHANNELS, CLASSES = 28, 28, 1, 10
CONV_FEATURES, DENSE, DROPOUT = (32, 64), 256, 0.3


class Cnn(nn.Module):

  def __init__(self):
    super().__init__()
    convs, channels = [], CHANNELS
    for features in CONV_FEATURES:
      convs.append(nn.Conv2d(channels, features, 3, padding='same'))
      channels = features
    self.convs = nn.ModuleList(convs)
    pooled = (HEIGHT // 2**len(CONV_FEATURES)) * (WIDTH // 2**len(CONV_FEATURES))
    self.hidden = nn.Linear(pooled * channels, DENSE)
    self.head = nn.Linear(DENSE, CLASSES)
    for layer in (*self.convs, self.hidden):  # He-uniform: bound sqrt(6 / fan_in)
      nn.init.kaiming_uniform_(layer.weight, nonlinearity='relu')
    nn.init.kaiming_uniform_(self.head.weight, nonlinearity='linear')  # LeCun-uniform
    for layer in (*self.convs, self.hidden, self.head):
      nn.init.zeros_(layer.bias)

  def forward(self, images):
    x = images
    for conv in self.convs:
      x = F.max_pool2d(F.relu(conv(x)), 2)
    x = F.dropout(F.relu(self.hidden(x.flatten(1))), DROPOUT, training=self.training)
    return self.head(x)


def _idx(name: str) -> np.ndarray:
  with gzip.open(os.path.join(_DATA.value, name), 'rb') as f:
    data = f.read()
  dims = data[3]
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _splits():
  """(train, validation, test) as (images [N, 1, 28, 28] float32 normalised, labels int64)."""
  images, labels = _idx('train-images-idx3-ubyte.gz'), _idx('train-labels-idx1-ubyte.gz')
  held = np.random.default_rng(0).permutation(len(images)) < len(images) // 10
  mean, std = images[~held].mean() / 255, images[~held].std() / 255
  tensor = lambda x: torch.from_numpy(((x / 255 - mean) / std).astype(np.float32)[:, None])
  test = _idx('t10k-images-idx3-ubyte.gz'), _idx('t10k-labels-idx1-ubyte.gz')
  return [(tensor(x), torch.from_numpy(y.astype(np.int64))) for x, y in
          ((images[~held], labels[~held]), (images[held], labels[held]), test)]


def _accuracy(model, images, labels) -> float:
  model.eval()
  with torch.no_grad():
    right = sum((model(images[i:i + 1000]).argmax(1) == labels[i:i + 1000]).sum().item()
                for i in range(0, len(images), 1000))
  model.train()
  return right / len(images)


def train(model, optimizer):
  """The whole job (see the module docstring); prints validation and test accuracy."""
  (images, labels), validation, test = _splits()
  steps, batch, per_epoch = _TRAIN_STEPS.value, _BATCH.value, len(images) // _BATCH.value
  rate = lambda s: (s / 100 if s < 100 else 0.01 + 0.99 * 0.5 * (
      1 + math.cos(math.pi * (s - 100) / max(steps - 100, 1))))
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
  checkpoints = tempfile.mkdtemp(prefix='torch_cnn_')
  for step in range(steps):
    if step % per_epoch == 0:
      order = torch.randperm(len(images))
    rows = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
    loss = F.cross_entropy(model(images[rows]), labels[rows])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    if (step + 1) % 50 == 0:
      print(f'step {step + 1}: loss {loss.item():.4f}', flush=True)
    if (step + 1) % _EVAL_EVERY.value == 0 or step + 1 == steps:
      print(f'step {step + 1}: validation accuracy {_accuracy(model, *validation):.4f}')
      torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()},
                 os.path.join(checkpoints, f'{step + 1}.pt'))
  print(f'test accuracy {_accuracy(model, *test):.4f}')


def main(argv):
  del argv
  torch.manual_seed(0)
  memory_format = torch.channels_last if _CHANNELS_LAST.value else torch.contiguous_format
  model = Cnn().to(memory_format=memory_format).train()
  kernels = [p for name, p in model.named_parameters() if name.endswith('weight')]
  biases = [p for name, p in model.named_parameters() if not name.endswith('weight')]
  optimizer = torch.optim.AdamW([{'params': kernels, 'weight_decay': 1e-4},
                                 {'params': biases, 'weight_decay': 0.0}],
                                lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
  if _TRAIN_STEPS.value:
    train(model, optimizer)
    return
  generator = torch.Generator().manual_seed(0)
  batches = [(torch.randn(_BATCH.value, CHANNELS, HEIGHT, WIDTH, generator=generator)
              .to(memory_format=memory_format),
              torch.randint(0, CLASSES, (_BATCH.value,), generator=generator))
             for _ in range(8)]
  times, loss = torch_reference.time_steps(
      model, optimizer, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
      lambda i: batches[i % len(batches)])
  torch_reference.print_figures(
      f'{"NHWC" if _CHANNELS_LAST.value else "NCHW"}, batch {_BATCH.value} x '
      f'{HEIGHT}x{WIDTH}x{CHANNELS}, loss {loss:.4f}', model, times, _BATCH.value, 'examples')


if __name__ == '__main__':
  app.run(main)
