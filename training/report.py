"""The run report, written from the metrics files when training is complete: `summary.json`
(where the run got to, every metric's last value, each eval metric's best and its step, median
throughput) and `report.png` (loss, eval metrics, learning rate and throughput against step)."""

import io
import json
import statistics

from etils import epath


def _better(key: str, larger_is_better: tuple[str, ...]):
  return max if key.endswith(larger_is_better) else min


def _throughput_keys(keys) -> list[str]:
  return sorted(k for k in keys if k.endswith('_per_second') and '/' not in k) + (
      ['perf/mfu'] if 'perf/mfu' in keys else [])


def summarize(records: list[dict], total_steps: int, larger_is_better: tuple[str, ...] = ()
              ) -> dict:
  """`larger_is_better`: the endings of the eval metrics that are better larger (the task's
  `larger_is_better`); every other one is better smaller."""
  keys = sorted({k for r in records for k in r} - {'step'})
  having = {k: [r for r in records if k in r] for k in keys}
  step = records[-1]['step'] if records else 0
  best = {}
  for key in (k for k in keys if k.startswith('eval/')):
    record = _better(key, larger_is_better)(having[key], key=lambda r, key=key: r[key])
    best[key] = {'value': record[key], 'step': record['step']}
  # The first logged rate includes compiling.
  median = {k: statistics.median(r[k] for r in having[k][1:] or having[k])
            for k in _throughput_keys(keys)}
  return {'step': step, 'total_steps': total_steps, 'complete': step >= total_steps,
          'last': {k: having[k][-1][k] for k in keys}, 'best': best, 'median': median}


def plot(records: list[dict]) -> bytes:
  """The PNG: one panel each for the training and eval losses, other eval metrics, the learning
  rate, and throughput."""
  import matplotlib  # pylint: disable=g-import-not-at-top; slow to load, needed only here
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  keys = {k for r in records for k in r}
  losses = [k for k in ('train/loss', 'eval/loss') if k in keys]
  panels = {'loss': losses,
            'eval metrics': sorted(k for k in keys if k.startswith('eval/') and k not in losses),
            'learning rate': ['learning_rate'] if 'learning_rate' in keys else [],
            'throughput': _throughput_keys(keys)[:1]}
  figure, axes = pyplot.subplots(2, 2, figsize=(11, 7.5))
  for ax, (title, names) in zip(axes.flat, panels.items()):
    for name in names:
      points = [(r['step'], r[name]) for r in records if name in r]
      ax.plot(*zip(*points), marker='.' if len(points) < 50 else None, label=name)
    ax.set(title=title, xlabel='step')
    ax.grid(alpha=0.3)
    if names:
      ax.legend(fontsize=8)
  figure.tight_layout()
  png = io.BytesIO()
  figure.savefig(png, format='png', dpi=80)
  pyplot.close(figure)
  return png.getvalue()


def write(workdir: str, records: list[dict], total_steps: int, sections: dict | None = None,
          larger_is_better: tuple[str, ...] = ()):
  """summary.json (with `sections`, what parts add: name -> JSON-able) and report.png in
  `workdir` (nothing if no step was logged); `larger_is_better` as `summarize` takes it."""
  if not records:
    return
  workdir = epath.Path(workdir)
  summary = summarize(records, total_steps, larger_is_better) | (sections or {})
  (workdir / 'summary.json').write_text(json.dumps(summary, indent=2))
  (workdir / 'report.png').write_bytes(plot(records))
