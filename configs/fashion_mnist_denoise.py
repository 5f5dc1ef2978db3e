"""A convolutional autoencoder denoising Fashion-MNIST (task denoise, model autoencoder).

`python train.py --config=configs/fashion_mnist_denoise.py --workdir=DIR`. The images are
Fashion-MNIST's (Debian's `dataset-fashion-mnist`, as configs/fashion_mnist_cnn.py reads them)
with N(0, 0.3^2) noise per pixel of [0, 1] (`task.noise_std`); eval/mse, eval/psnr and the
noisy inputs' eval/noisy_psnr on the validation split, test/* at the end. Presets: `tiny` and
the parallelism ones.
"""

from configs import common


def get_config(presets: str = ''):
  return common.apply_presets(common.image_config('autoencoder', 'fashion_mnist', task='denoise'),
                              presets, common.IMAGE_PRESETS, common.image_preset)
