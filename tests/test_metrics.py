"""The metrics files: chunks rewritten whole, and one history after a resume or a rollback."""

import os

import pytest

from training import metrics


@pytest.fixture
def three_per_chunk(monkeypatch):
  monkeypatch.setattr(metrics, 'RECORDS_PER_CHUNK', 3)


def _log(workdir, steps, resumed_step=0, value=1.0):
  writer = metrics.MetricsWriter(str(workdir), resumed_step=resumed_step)
  for step in steps:
    writer.write(step, {'train/loss': value})
  return writer


def _chunks(workdir):
  return sorted(os.listdir(workdir / 'metrics'))


def test_records_fill_chunks_in_order(tmp_path, three_per_chunk):
  _log(tmp_path, range(1, 9)).close()
  assert _chunks(tmp_path) == ['00000.jsonl', '00001.jsonl', '00002.jsonl']
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == list(range(1, 9))
  assert (tmp_path / 'metrics' / '00002.jsonl').read_text().count('\n') == 2


def test_a_resume_drops_later_records_and_continues_the_chunk_it_cut(tmp_path, three_per_chunk):
  _log(tmp_path, range(1, 9)).close()
  _log(tmp_path, range(5, 8), resumed_step=4, value=2.0).close()
  records = metrics.read_metrics(tmp_path)
  assert [(r['step'], r['train/loss']) for r in records] == [
      (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0), (6, 2.0), (7, 2.0)]
  assert _chunks(tmp_path) == ['00000.jsonl', '00001.jsonl', '00002.jsonl']


def test_a_rollback_to_a_chunk_boundary_deletes_the_chunks_after_it(tmp_path, three_per_chunk):
  writer = _log(tmp_path, range(1, 9))
  writer.rewind(3)
  assert _chunks(tmp_path) == ['00000.jsonl']
  writer.write(4, {'train/loss': 2.0})
  writer.close()
  assert _chunks(tmp_path) == ['00000.jsonl', '00001.jsonl']
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_resume_before_every_record_starts_afresh(tmp_path, three_per_chunk):
  _log(tmp_path, range(1, 5)).close()
  _log(tmp_path, [1], value=2.0).close()
  assert [(r['step'], r['train/loss']) for r in metrics.read_metrics(tmp_path)] == [(1, 2.0)]


def test_a_temporary_file_left_by_a_crash_is_not_read(tmp_path):
  _log(tmp_path, [1, 2]).close()
  (tmp_path / 'metrics' / '.00000.jsonl.tmp').write_text('{"step": 1, "train/lo')
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2]


def test_no_metrics_yet_reads_as_no_records(tmp_path):
  assert metrics.read_metrics(tmp_path) == []
