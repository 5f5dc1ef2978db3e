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

import resource
import statistics
import time

import numpy as np
import torch
from absl import app, flags
from torch import nn
from torch.nn import functional as F

_BATCH = flags.DEFINE_integer('batch', 128, 'Examples per step.')
_STEPS = flags.DEFINE_integer('steps', 100, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed steps first (compilation included).')
_CHANNELS_LAST = flags.DEFINE_bool('channels_last', False, 'NHWC activations (podium\'s layout) '
                                   'instead of PyTorch\'s default NCHW.')
_COMPILE = flags.DEFINE_bool('compile', False, 'Time torch.compile(model) instead of eager.')

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
  step_model = torch.compile(model) if _COMPILE.value else model
  generator = torch.Generator().manual_seed(0)
  batches = [(torch.randn(_BATCH.value, CHANNELS, HEIGHT, WIDTH, generator=generator)
              .to(memory_format=memory_format),
              torch.randint(0, CLASSES, (_BATCH.value,), generator=generator))
             for _ in range(8)]
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    images, labels = batches[i % len(batches)]
    start = time.perf_counter()
    loss = F.cross_entropy(step_model(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  print(f'[torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'{"torch.compile" if _COMPILE.value else "eager"}, '
        f'{"NHWC" if _CHANNELS_LAST.value else "NCHW"}] '
        f'{sum(p.numel() for p in model.parameters()):,} params, batch {_BATCH.value} x '
        f'{HEIGHT}x{WIDTH}x{CHANNELS}, loss {loss.item():.4f}')
  print(f'  step        median {step_s * 1e3:.2f} ms (p10 {np.percentile(times, 10) * 1e3:.2f}, '
        f'p90 {np.percentile(times, 90) * 1e3:.2f}) over {len(times)} steps')
  print(f'  throughput  {_BATCH.value / step_s:,.0f} examples/s')
  print(f'  memory      peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} '
        'MiB')


if __name__ == '__main__':
  app.run(main)
