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
"""

import os
import sys

import torch
from absl import app, flags
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import torch_reference  # pylint: disable=wrong-import-position

_BATCH = flags.DEFINE_integer('batch', 128, 'Examples per step.')
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
