"""What a run leaves for people to read: the run report (summary.json, report.png), TensorBoard's
view of a resumed or rolled-back run, profiler traces and device memory. The report and event
checks of full runs live with the runs that produce them: test_train_e2e (report, and the
event-file reader), test_faults (resume), test_nonfinite (rollback)."""

import glob
import gzip
import json
import os

from tests.test_train_e2e import run_train
from training import report
from training.parts import metrics_logger

RECORDS = [
    {'step': 1, 'train/loss': 3.0, 'learning_rate': 0.1, 'images_per_second': 10.0,
     'perf/mfu': 0.01},
    {'step': 2, 'train/loss': 2.0, 'learning_rate': 0.2, 'images_per_second': 100.0,
     'perf/mfu': 0.10, 'eval/loss': 1.5, 'eval/accuracy': 0.6, 'eval/macro_f1': 0.5},
    {'step': 3, 'train/loss': 1.0, 'learning_rate': 0.2, 'images_per_second': 300.0,
     'perf/mfu': 0.30},
    {'step': 4, 'train/loss': 1.2, 'learning_rate': 0.1, 'images_per_second': 200.0,
     'perf/mfu': 0.20, 'eval/loss': 1.7, 'eval/accuracy': 0.7, 'eval/macro_f1': 0.6},
]


def test_summary_keeps_last_values_best_evals_and_median_throughput():
  summary = report.summarize(RECORDS, total_steps=10, larger_is_better=('accuracy', 'f1'))
  assert (summary['step'], summary['total_steps'], summary['complete']) == (4, 10, False)
  assert summary['last']['train/loss'] == 1.2 and summary['last']['eval/loss'] == 1.7
  assert summary['best'] == {'eval/loss': {'value': 1.5, 'step': 2},  # smaller is better
                             'eval/accuracy': {'value': 0.7, 'step': 4},  # larger is better
                             'eval/macro_f1': {'value': 0.6, 'step': 4}}
  # The first logged step (compiling) is left out of the medians.
  assert summary['median'] == {'images_per_second': 200.0, 'perf/mfu': 0.2}
  assert report.summarize(RECORDS, total_steps=4)['complete']


def test_report_png_is_an_image(tmp_path):
  report.write(str(tmp_path), RECORDS, total_steps=4)
  assert (tmp_path / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'summary.json').exists()
  report.write(str(tmp_path / 'empty'), [], total_steps=4)  # nothing logged: nothing written
  assert not (tmp_path / 'empty').exists()


def test_profile_steps_trace_the_train_step_into_the_tensorboard_dir(tmp_path):
  result = run_train(tmp_path, '--config.train.profile_steps=(3, 2)', '--config.task.num_samples=0')
  assert result.returncode == 0, result.stderr
  assert f'profiling steps 3-4 into {tmp_path / "tensorboard"}' in result.stdout
  [trace] = glob.glob(str(tmp_path / 'tensorboard/plugins/profile/*/*.trace.json.gz'))
  assert glob.glob(os.path.join(os.path.dirname(trace), '*.xplane.pb'))  # what TensorBoard reads
  with gzip.open(trace) as f:
    names = {event.get('name') for event in json.load(f)['traceEvents']}
  assert 'PjitFunction(train_step)' in names


def test_bad_profile_steps_exit_2_with_one_line(tmp_path):
  result = run_train(tmp_path, '--config.train.profile_steps=(0, 3)')
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('train.py: error:')]
  assert len(errors) == 1 and 'train.profile_steps: must be (first step, count)' in errors[0]


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_device_memory_reports_the_fullest_device_where_the_backend_tells():
  devices = [_Device({'bytes_in_use': 5, 'peak_bytes_in_use': 9, 'bytes_limit': 16}),
             _Device({'bytes_in_use': 7, 'peak_bytes_in_use': 8, 'bytes_limit': 16})]
  assert metrics_logger.device_memory(devices) == {'memory/bytes_in_use': 7.0,
                                          'memory/peak_bytes_in_use': 9.0,
                                          'memory/bytes_limit': 16.0}
  assert metrics_logger.device_memory([_Device(None)]) == {}  # CPUs report nothing
