"""Classification reports: the confusion matrices (JSON and PNG) of the validation and test
splits with their per-class scores (`per_class`, whose F1 also gives the task's macro-F1), and
the training split's class histogram at the start of a run."""

import io
import json

import jax
from etils import epath
import numpy as np

from tasks import base


class ConfusionMatrix(base.Part):
  """After each evaluation: WORKDIR/confusion_matrix_validation.json (matrix, per-class
  precision, recall, F1 and support, the step) and .png; when training is complete, the same for
  the test split: confusion_matrix_test.json and .png."""

  def __init__(self, class_names):
    self.class_names = class_names

  def after_step(self, run, step, state, results):
    if 'eval' in results:  # the evaluator's named result
      self._write(run, 'validation', results['eval'].sums, step)

  def at_end(self, run, state, results):
    if 'test' in results:
      self._write(run, 'test', results['test'].sums, results['test'].step)

  def _write(self, run, split, sums, step):
    if jax.process_index() != 0:
      return
    confusion = np.asarray(sums['confusion']).round().astype(np.int64)
    scores = per_class(confusion)
    report = {'step': step, 'split': split, 'classes': self.class_names,
              'confusion': confusion.tolist(), 'rows': 'true class',
              'columns': 'predicted class', **{k: v.tolist() for k, v in scores.items()}}
    workdir = epath.Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f'confusion_matrix_{split}.json').write_text(json.dumps(report, indent=1))
    (workdir / f'confusion_matrix_{split}.png').write_bytes(
        _plot(confusion, self.class_names, f'{split}, step {step}'))


class ClassHistogram(base.Part):
  """Logs the training split's records per class when the run starts, and puts them in the
  run report (summary.json 'train_classes')."""

  def __init__(self, class_names, counts):
    self.class_names, self.counts = class_names, [int(c) for c in counts]

  def at_start(self, run, state):
    total = max(sum(self.counts), 1)
    run.announce('train classes: ' + ', '.join(
        f'{name} {count} ({count / total:.1%})'
        for name, count in zip(self.class_names, self.counts)))

  def at_end(self, run, state, results):
    return {'summary/train_classes': dict(zip(self.class_names, self.counts))}


def _plot(confusion, class_names, title) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top; only when a report is written
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  n = len(confusion)
  figure, axes = pyplot.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
  shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  axes.imshow(shares, cmap='Blues', vmin=0, vmax=1)
  for (row, column), count in np.ndenumerate(confusion):
    axes.text(column, row, str(count), ha='center', va='center', fontsize=7,
              color='white' if shares[row, column] > 0.5 else 'black')
  axes.set_xticks(range(n), class_names, rotation=90)
  axes.set_yticks(range(n), class_names)
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  axes.set_title(f'confusion matrix: {title}')
  figure.tight_layout()
  png = io.BytesIO()
  figure.savefig(png, format='png', dpi=100)
  pyplot.close(figure)
  return png.getvalue()


def per_class(confusion) -> dict[str, np.ndarray]:
  """Precision, recall and F1 per class from a [true, predicted] confusion matrix (0 where a
  class was never predicted or never present)."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  predicted, present = confusion.sum(axis=0), confusion.sum(axis=1)
  precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
  recall = np.divide(hits, present, out=np.zeros_like(hits), where=present > 0)
  both = precision + recall
  f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
  return {'precision': precision, 'recall': recall, 'f1': f1, 'support': present}
