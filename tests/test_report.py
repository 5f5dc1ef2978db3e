"""The run report (summary.json, report.png) and TensorBoard's view of a resumed or rolled-back
run. End-to-end checks live with the runs that produce them: test_train_e2e (report),
test_faults (resume), test_nonfinite (rollback); this file holds the event-file reader."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from training import report


def tensorboard_scalars(workdir, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard shows them, in the order written: event files read
  in name order, and a session START at step s purging every point at step >= s before it
  (what TensorBoard does with a writer's `purge_step`)."""
  points = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    for event in _events(path):
      if event.session_log.status == event_pb2.SessionLog.START:
        points = [(s, v) for s, v in points if s < event.step]
      points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return points


def _events(path):
  """The Event protos of one TFRecord file (length, its CRC, the record, its CRC)."""
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    offset += 12
    yield event_pb2.Event.FromString(data[offset:offset + length])
    offset += length + 4


RECORDS = [
    {'step': 1, 'train/loss': 3.0, 'learning_rate': 0.1, 'images_per_second': 10.0,
     'perf/mfu': 0.01},
    {'step': 2, 'train/loss': 2.0, 'learning_rate': 0.2, 'images_per_second': 100.0,
     'perf/mfu': 0.10, 'eval/loss': 1.5, 'eval/accuracy': 0.6},
    {'step': 3, 'train/loss': 1.0, 'learning_rate': 0.2, 'images_per_second': 300.0,
     'perf/mfu': 0.30},
    {'step': 4, 'train/loss': 1.2, 'learning_rate': 0.1, 'images_per_second': 200.0,
     'perf/mfu': 0.20, 'eval/loss': 1.7, 'eval/accuracy': 0.7},
]


def test_summary_keeps_last_values_best_evals_and_median_throughput():
  summary = report.summarize(RECORDS, total_steps=10)
  assert (summary['step'], summary['total_steps'], summary['complete']) == (4, 10, False)
  assert summary['last']['train/loss'] == 1.2 and summary['last']['eval/loss'] == 1.7
  assert summary['best'] == {'eval/loss': {'value': 1.5, 'step': 2},  # smaller is better
                             'eval/accuracy': {'value': 0.7, 'step': 4}}  # larger is better
  # The first logged step (compiling) is left out of the medians.
  assert summary['median'] == {'images_per_second': 200.0, 'perf/mfu': 0.2}
  assert report.summarize(RECORDS, total_steps=4)['complete']


def test_report_png_is_an_image(tmp_path):
  report.write(str(tmp_path), RECORDS, total_steps=4)
  assert (tmp_path / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'summary.json').exists()
  report.write(str(tmp_path / 'empty'), [], total_steps=4)  # nothing logged: nothing written
  assert not (tmp_path / 'empty').exists()
