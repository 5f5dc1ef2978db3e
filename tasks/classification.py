"""Classification of images or texts into `model.num_classes` classes (task.name='classification').

Batches are {'inputs', 'label'}: images float32 [B, H, W, C] (normalised; H, W, C from
`model.image_shape`) or token ids int32 [B, L] (texts, L = `data.seq_len`); eval batches also
carry 'mask' (1 for a real example, 0 for padding), so the whole eval split counts, each example
once. Training batches carry 'label_b' and 'mix' with mixup or cutmix (the loss is
mix * CE(label) + (1 - mix) * CE(label_b)) and 'weight' with data.balance=reweight (each
example's loss is weighed by it); the training split's class histogram is logged at the start
and written to summary.json as 'train_classes'. The model is called as
`model(inputs, train=..., rngs=...)` and returns logits [B, C].

Eval figures: loss, accuracy, top-k accuracy (k = `task.top_k`, when there are more classes), and
macro-F1. On the validation split (data/classification.py) every `train.eval_every` steps, as
eval/* in the metrics files, with per-class precision, recall and F1 and the confusion matrix in
WORKDIR/confusion_matrix_validation.json and .png; on the test split once, when training is
complete, as test/* (metrics files and summary.json) and confusion_matrix_test.json and .png.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import augment
from data import classification as data_lib
from tasks import base, reports


def default_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = 'classification'
  t.top_k = 5  # also report top-k accuracy when there are more than k classes
  # Training targets: s spread evenly over the classes, 1 - s more on the label (Szegedy et
  # al. 2016). The eval loss stays the plain cross-entropy, comparable across settings.
  t.label_smoothing = 0.0
  return t


CHOICES = (data_lib.SOURCES,)  # the data section's registered choices


def default_data_config() -> ml_collections.ConfigDict:
  return data_lib.default_data_config()


def _is_image(config) -> bool:
  """Whether the model takes images (it declares their shape) rather than token ids."""
  return 'image_shape' in config.model


class Task(base.Task):
  """Cross-entropy on integer labels; accuracy as the training-time auxiliary figure."""
  larger_is_better = ('accuracy', 'f1')

  def __init__(self, config, model_module):
    super().__init__(config, model_module)
    self.unit = 'images' if _is_image(config) else 'examples'
    self.class_names = [str(i) for i in range(config.model.num_classes)]
    self.class_counts = None  # records per class of the training split, once it is read

  def validate(self):
    d, m = self.config.data, self.config.model
    # Keys set for other sources are refused by config_check.keep_chosen, where the command line
    # is known; a run's config.json from before may still hold them, and evaluates.
    data_lib.SOURCES.validate(d, takes='images' if _is_image(self.config) else 'texts',
                              model=m.name)
    _require(self.config.task.top_k > 0, 'task.top_k', 'must be positive')
    smoothing = self.config.task.label_smoothing
    _require(0 <= smoothing < 1, 'task.label_smoothing', f'must be in [0, 1), got {smoothing}')
    augment.names(d, 'image' if _is_image(self.config) else 'text')
    data_lib.check_balance(d)
    _require(0 < d.validation_fraction < 1, 'data.validation_fraction',
             f'{d.validation_fraction} is not in (0, 1)')
    if d.tokenizer and not _is_image(self.config):
      from data import tokenizers  # pylint: disable=g-import-not-at-top; text sources are optional
      size = tokenizers.Vocabulary(d.tokenizer).size  # ValueError naming data.tokenizer
      _require(m.vocab_size >= size, 'model.vocab_size',
               f'{m.vocab_size} < {size}, the ids of data.tokenizer={d.tokenizer}')

  def batch_spec(self, split):
    d = self.config.data
    size = d.global_batch_size
    if _is_image(self.config):
      inputs = base.Field((size, *self.config.model.image_shape), jnp.float32,
                          ('batch', None, None, None))
    else:
      inputs = base.Field((size, d.seq_len), jnp.int32, ('batch', 'length'))
    spec = {'inputs': inputs, 'label': base.Field((size,), jnp.int32, ('batch',))}
    per_example = lambda dtype: base.Field((size,), dtype, ('batch',))
    if split == 'eval':
      spec['mask'] = per_example(jnp.float32)
    elif augment.mixes(d):
      spec.update(label_b=per_example(jnp.int32), mix=per_example(jnp.float32))
    if split == 'train' and d.balance == 'reweight':
      spec['weight'] = per_example(jnp.float32)
    return spec

  def loss(self, model, batch, rngs):
    logits_BxC = model(batch['inputs'], train=True, rngs=rngs)
    smoothing = self.config.task.label_smoothing
    losses_B = cross_entropy(logits_BxC, batch['label'], smoothing)
    if 'mix' in batch:
      mix_B = batch['mix']
      losses_B = mix_B * losses_B + (1 - mix_B) * cross_entropy(logits_BxC, batch['label_b'],
                                                                smoothing)
    if 'weight' in batch:
      losses_B = losses_B * batch['weight']
    accuracy = jnp.mean(jnp.argmax(logits_BxC, -1) == batch['label'])
    return losses_B.mean(), {'accuracy': accuracy}

  def eval_sums(self, model, batch):
    logits_BxC = model(batch['inputs'], train=False)
    labels_B, mask_B = batch['label'], batch['mask']
    num_classes = logits_BxC.shape[-1]
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    k = min(self.config.task.top_k, num_classes)
    top_k_BxK = jax.lax.top_k(logits_BxC, k)[1]
    in_top_k_B = jnp.any(top_k_BxK == labels_B[:, None], axis=-1)
    truth_BxC = jax.nn.one_hot(labels_B, num_classes) * mask_B[:, None]
    predicted_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), num_classes)
    return {'loss_sum': jnp.sum(losses_B * mask_B), 'count': jnp.sum(mask_B),
            'top_k_correct': jnp.sum(in_top_k_B * mask_B),
            'confusion': truth_BxC.T @ predicted_BxC}  # [true class, predicted class]

  def eval_metrics(self, sums):
    count = max(float(sums['count']), 1.0)
    figures = {'loss': float(sums['loss_sum']) / count,
               'accuracy': float(np.trace(sums['confusion'])) / count,
               'macro_f1': float(np.mean(reports.per_class(sums['confusion'])['f1']))}
    if sums['confusion'].shape[0] > self.config.task.top_k:
      figures[f'top{self.config.task.top_k}_accuracy'] = float(sums['top_k_correct']) / count
    return figures

  def train_batches(self, stats):
    source = data_lib.make_source(self.config.data, 'train')
    self._check_source(source)
    self.class_names = list(source.class_names)
    labels = None  # reading them all is slow for sources without a label index (TFDS)
    if hasattr(source, 'labels') or self.config.data.balance != 'none':
      labels = data_lib.source_labels(source)
      self.class_counts = data_lib.class_counts(labels, source.num_classes)
    return data_lib.train_batches(source, self.config.data, process_index=jax.process_index(),
                                  process_count=jax.process_count(), stats=stats,
                                  labels=labels)

  def split_batches(self, split):
    source = data_lib.make_source(self.config.data, split)
    self._check_source(source)
    return data_lib.eval_batches(source, self.config.data, process_index=jax.process_index(),
                                 process_count=jax.process_count())

  def _check_source(self, source):
    m = self.config.model
    takes = 'image' if _is_image(self.config) else 'text'
    _require(source.kind == takes, 'data.name',
             f'{source!r} holds {source.kind}s, and model.name={m.name!r} takes {takes}s')
    _require(source.num_classes == m.num_classes, 'model.num_classes',
             f'{m.num_classes}, but {source!r} has {source.num_classes} classes')
    if source.kind == 'image' and len(source):
      shape = tuple(source[0]['inputs'].shape)
      _require(shape == tuple(m.image_shape), 'model.image_shape',
               f'{tuple(m.image_shape)}, but the images of {source!r} are {shape}')

  def parts(self, run):
    histogram = ([] if self.class_counts is None else
                 [reports.ClassHistogram(self.class_names, self.class_counts)])
    return [reports.ConfusionMatrix(self.class_names), *histogram]


def cross_entropy(logits_BxC, labels_B, smoothing: float):
  """Per-example cross-entropy against the labels, smoothed by `smoothing` (0: none)."""
  if not smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits_BxC, targets_BxC)


def _require(ok, key, message):
  if not ok:
    raise ValueError(f'{key}: {message}')
