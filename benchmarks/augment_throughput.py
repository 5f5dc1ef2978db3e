"""Images/s of the classification input pipeline alone, per `data.augment` setting:
`python benchmarks/augment_throughput.py [--augments='none;flip,crop;...'] [--batches=100]`.

Reads Fashion-MNIST's training IDX files (Debian's `dataset-fashion-mnist`, or --path) with
configs/fashion_mnist_cnn.py's data config (batch 128, normalised), and for each setting times
--batches batches after a few to warm up, on the configured worker threads. No model: this is
what the pipeline can feed, to set beside train.py's images_per_second. Prints figures only.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import fashion_mnist_cnn  # pylint: disable=wrong-import-position
from data import classification, pipeline  # pylint: disable=wrong-import-position

_AUGMENTS = flags.DEFINE_string(
    'augments', 'none;flip,crop;flip,crop,jitter;flip,crop,jitter,mixup;flip,crop,cutmix',
    'data.augment settings to time, separated by semicolons.')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches timed per setting.')
_PATH = flags.DEFINE_string('path', '/usr/share/datasets/fashion-mnist', 'The IDX files.')
_WARMUP = 5


def _images_per_second(data_cfg, source) -> float:
  iterator = iter(classification.train_batches(source, data_cfg, process_index=0,
                                               process_count=1))
  for _ in range(_WARMUP):
    next(iterator)
  started = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - started
  iterator.close()
  return _BATCHES.value * data_cfg.global_batch_size / seconds


def main(argv):
  del argv
  data_cfg = fashion_mnist_cnn.get_config().data
  data_cfg.path = _PATH.value
  if not os.path.isdir(data_cfg.path):
    sys.exit(f'no Fashion-MNIST at {data_cfg.path}; apt-get install dataset-fashion-mnist')
  source = classification.make_source(data_cfg, 'train')
  print(f'{len(source)} images, batch {data_cfg.global_batch_size}, '
        f'{pipeline.resolve_threads(data_cfg.worker_threads)} worker threads, '
        f'{os.cpu_count()} CPUs (maybe shared)')
  for setting in _AUGMENTS.value.split(';'):
    data_cfg.augment = setting
    print(f'augment={setting:<28} {_images_per_second(data_cfg, source):9,.0f} images/s')


if __name__ == '__main__':
  app.run(main)
