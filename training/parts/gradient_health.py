"""The gradient health part: per-layer norms as metrics, vanishing and exploding layers named
(the numbers and the detector: training/health.py)."""

import jax
import numpy as np

from tasks.base import Part
from training import health, metrics


class GradientHealth(Part):
  """Every `health.every` steps: per-layer norms as metrics (and TensorBoard histograms across
  layers), vanishing and exploding layers counted, and named in one line when there are any."""
  name = 'gradient_health'

  def __init__(self, run):
    self.every = run.config.health.every
    self.names = [name for name, _ in health.layers(run.setup.param_template)]
    self.detector = health.Detector(self.names, run.config.health)
    self.pending = None  # this health step's norms on device, until fetched and checked

  def after_step(self, run, step, state, results):
    self.pending = None if step % self.every else results['health/norms']

  def after_fetch(self, run, step, results):
    if step % self.every:
      return None
    self.pending = None
    grad, param, update = np.asarray(results['health/norms'], np.float64)
    ratio = update / np.maximum(param, np.finfo(np.float32).tiny)
    vanishing, exploding, median = self.detector.check(grad)
    if vanishing or exploding:
      found = [f'{what} in {_listed(names)}' for what, names in
               (('vanishing gradients', vanishing), ('exploding gradients', exploding)) if names]
      run.announce(f'step {step}: gradient health: {"; ".join(found)} (median layer grad norm '
                   f'{median:.3g})')
    figures = {'health/vanishing_layers': len(vanishing),
               'health/exploding_layers': len(exploding)}
    for kind, values in (('grad_norm', grad), ('update_ratio', ratio)):  # across layers
      figures[f'health/log10_{kind}'] = metrics.Histogram(np.log10(values[values > 0]))
    for kind, values in (('grad_norm', grad), ('param_norm', param), ('update_ratio', ratio)):
      figures.update({f'health/{kind}/{n}': v for n, v in zip(self.names, values)})
    return figures

  def checkpoint_state(self):
    """The history, with the step being saved if it is a health step: it is checked only after
    the save (one step late), and a run resumed from the save starts after it. Waits for that
    step's norms, on health steps only."""
    saved = self.detector.state()
    if self.pending is not None:
      for name, norm in zip(self.names, np.asarray(jax.device_get(self.pending))[0]):
        saved[name] = (saved[name] + [float(norm)])[-self.detector.cfg.window:]
    return saved

  def restore(self, run, saved):
    self.detector.restore(saved)


_NAMED_AT_MOST = 8  # a log line stays readable when a whole deep model is flagged


def _listed(names):
  more = len(names) - _NAMED_AT_MOST
  return ', '.join(names[:_NAMED_AT_MOST]) + (f' and {more} more' if more > 0 else '')


def build(run):
  return [GradientHealth(run)] if run.config.health.every else []
