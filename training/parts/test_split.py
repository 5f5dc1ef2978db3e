"""The test split, once, when training is complete."""

from tasks.base import Part
from training.parts import evaluation


class TestSplit(Part):
  """When training is complete: the task's metrics on its test split (test/*, in the last
  metrics record, summary.json's `test` section and the named result `test`), once, on early
  stopping's best parameters (the named result `best_state`) if it kept some, else the last."""

  def at_end(self, run, state, results):
    best = results.get('best_state')  # (step, a function that reads them)
    step, kept = (best[0], best[1]()) if best else (run.step, state)
    placed = [run.place_eval(b) for b in run.test_batches]  # only now: they are used once
    test = evaluation.evaluate(run, kept, placed, step, 'best/' if best else 'last')
    figures = {f'test/{k}': v for k, v in test.figures.items()}
    run.announce(f'test split, step {step} ({test.parameters} parameters): ' +
                 '  '.join(f'{k} {v:.4f}' for k, v in figures.items()))
    return {**figures, 'test': test,
            'summary/test': {'step': step, 'parameters': test.parameters, **figures}}


def build(run):
  return [TestSplit()] if run.test_batches else []
