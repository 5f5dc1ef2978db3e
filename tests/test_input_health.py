"""Input-pipeline health: the share of time training waits for data, the pipeline's own rate,
and the warning when waiting takes too much of the time."""

import functools
import types

import pytest

from configs import default
from data import pipeline
from training import config_check
from training.parts import data_health


class FakeClock:
  """perf_counter for training.parts.data_health: moves only when told."""

  def __init__(self):
    self.now = 100.0

  def perf_counter(self):
    return self.now


@pytest.fixture(name='clock')
def fixture_clock(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(data_health, 'time', types.SimpleNamespace(perf_counter=clock.perf_counter))
  return clock


class SlowIterator:
  """Batches that take `wait` seconds of the (fake) clock each; each costs the pipeline `work`."""

  def __init__(self, clock, stats, wait, work):
    self.clock, self.stats, self.wait, self.work = clock, stats, wait, work

  def __next__(self):
    self.clock.now += self.wait
    self.stats.add_batch_work(self.work)
    return {}


def _health(clock, wait, work, warn_wait_share=0.05):
  config = default.get_config('tiny')
  config.data.warn_wait_share = warn_wait_share
  announced = []
  stats = pipeline.RecordStats()
  run = types.SimpleNamespace(config=config, announce=announced.append, record_stats=stats,
                              batch_waits=data_health.BatchWaits(),
                              task=types.SimpleNamespace(unit='tokens',
                                                         units_per_example=lambda: 32))
  # figures(): as on a logged step
  return (functools.partial(data_health.DataHealth(run).figures, run), run.batch_waits,
          SlowIterator(clock, stats, wait, work), announced)


def _steps(clock, waits, iterator, count, step_seconds):
  for _ in range(count):
    waits.next_batch(iterator)  # as the loop reads its batches
    clock.now += step_seconds  # the step's own work


def test_wait_share_and_pipeline_rate_over_each_window(clock):
  figures, waits, iterator, announced = _health(clock, wait=0.01, work=0.004)
  _steps(clock, waits, iterator, 1, step_seconds=30)  # the first batch, then compiling
  assert 'data/wait_share' not in figures()
  _steps(clock, waits, iterator, 10, step_seconds=0.99)
  logged = figures()
  assert logged['data/wait_share'] == pytest.approx(0.01)  # 0.1 s of 10 s, compiling left out
  # 10 batches of 8 rows x 32 tokens in 0.04 s of the pipeline's work
  assert logged['data/pipeline_tokens_per_second'] == pytest.approx(8 * 32 / 0.004)
  assert not announced


def test_warns_when_waiting_is_too_much_of_the_time_and_again_after_recovering(clock):
  figures, waits, iterator, announced = _health(clock, wait=0.5, work=0.5, warn_wait_share=0.2)
  _steps(clock, waits, iterator, 5, step_seconds=0.5)
  assert figures()['data/wait_share'] == pytest.approx(0.5)
  assert len(announced) == 1 and 'data.warn_wait_share=0.2' in announced[0]
  _steps(clock, waits, iterator, 5, step_seconds=0.5)
  figures()
  assert len(announced) == 1  # still slow: said once
  iterator.wait = 0.0
  _steps(clock, waits, iterator, 5, step_seconds=0.5)
  assert figures()['data/wait_share'] == 0.0
  iterator.wait = 0.5
  _steps(clock, waits, iterator, 5, step_seconds=0.5)
  figures()
  assert len(announced) == 2


@pytest.mark.parametrize('share', [0, 1.5])
def test_warn_wait_share_outside_0_1_is_a_config_error(share):
  config = default.get_config('tiny')
  config.data.warn_wait_share = share
  with pytest.raises(config_check.ConfigError, match=r'^data.warn_wait_share: must be in \(0, 1\]'):
    config_check.validate(config, num_devices=8, num_processes=1)
