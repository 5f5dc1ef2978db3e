"""Where a finished `train.py` run's wall time and memory went, read from what the run wrote.

Boundaries come from the run's own records, nothing more: its log file (WORKDIR/logs/, absl
lines with timestamps: 'Modules imported.', Orbax's 'CheckpointManager created' and save
lines, and JAX's compile lines when JAX_LOG_COMPILES=1), the time each line reached the
terminal (run_trace), the logged steps' wall times in the TensorBoard event files and their
rates in WORKDIR/metrics/*.jsonl (the training rate leaves evaluation out, so a window's wall
time less its training time is its evaluation), and summary.json's modification time.
`phases(trace, workdir, units_per_step, step_s)` returns rows (name, seconds, start, end) that
add up to the run's wall time; `step_s` (the in-process step time) splits the steps into the
step itself and the host work around it.
"""

import datetime
import glob
import json
import os
import re
import struct

_LOG_LINE = re.compile(r'^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ [^\]]*\] (.*)$')
_COMPILE = re.compile(r'Finished (?:tracing|jaxpr to MLIR module conversion|XLA compilation of) '
                      r'(?:jit\()?([\w<>]+)\)?(?: for jit)? in ([\d.]+) sec')


def log_records(workdir: str, year: int) -> list[tuple[float, str]]:
  """(time, message) of every record in the run's log files (local time, as absl writes it)."""
  records = []
  for path in sorted(glob.glob(os.path.join(workdir, 'logs', '*.log'))):
    with open(path, encoding='utf-8', errors='replace') as f:
      for line in f:
        m = _LOG_LINE.match(line)
        if m:
          month, day, hour, minute, second, message = m.groups()
          stamp = datetime.datetime(year, int(month), int(day), int(hour), int(minute))
          records.append((stamp.timestamp() + float(second), message))
  return sorted(records)


def compiles(records) -> dict[str, float]:
  """Seconds of tracing, lowering and XLA compiling per jitted function (JAX_LOG_COMPILES=1)."""
  seconds = {}
  for _, message in records:
    m = _COMPILE.search(message)
    if m:
      seconds[m.group(1)] = seconds.get(m.group(1), 0.0) + float(m.group(2))
  return seconds


def _first(records, text: str, after: float = 0.0):
  return next((t for t, message in records if t > after and text in message), None)


def _varint(data: bytes, offset: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[offset]
    value, shift, offset = value | (byte & 0x7f) << shift, shift + 7, offset + 1
    if byte < 0x80:
      return value, offset


def _event(data: bytes) -> tuple[float, int, bool]:
  """(wall_time, step, has a summary) of one serialised tensorboard Event (fields 1, 2, 5)."""
  wall, step, summary, offset = 0.0, 0, False, 0
  while offset < len(data):
    key, offset = _varint(data, offset)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, offset = _varint(data, offset)
      step = value if field == 2 else step
    elif wire == 1:
      wall = struct.unpack('<d', data[offset:offset + 8])[0] if field == 1 else wall
      offset += 8
    elif wire == 2:
      length, offset = _varint(data, offset)
      summary, offset = summary or field == 5, offset + length
    else:  # wire 5, fixed32
      offset += 4
  return wall, step, summary


def logged_step_times(workdir: str) -> dict[int, float]:
  """step -> wall time its metrics were written (the first TensorBoard event of each step)."""
  times = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):  # TFRecord: length, its CRC, the record, the record's CRC
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      wall, step, summary = _event(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if summary and step not in times:
        times[step] = wall
  return times


def metrics(workdir: str) -> list[dict]:
  records = []
  for path in sorted(glob.glob(os.path.join(workdir, 'metrics', '*.jsonl'))):
    with open(path, encoding='utf-8') as f:
      records += [json.loads(line) for line in f if line.strip()]
  return records


def _windows(records, times, rate_key, units_per_step, start):
  """Per logged window: (first step, last step, wall, training seconds, data wait seconds)."""
  windows, last_step, last_time = [], 0, start
  for record in records:
    step = record['step']
    if rate_key not in record or step not in times or step <= last_step:
      continue
    wall = times[step] - last_time
    training = min(wall, (step - last_step) * units_per_step / max(record[rate_key], 1e-9))
    waited = record.get('data/wait_share', 0.0) * training
    windows.append((last_step + 1, step, wall, training, waited))
    last_step, last_time = step, times[step]
  return windows


def phases(trace, workdir: str, units_per_step: int, unit: str, step_s: float | None):
  """Rows (name, seconds, start, end) covering the run from start to exit; see the docstring."""
  records = log_records(workdir, datetime.datetime.fromtimestamp(trace.start).year)
  compiled = compiles(records)
  times = logged_step_times(workdir)
  windows = _windows(metrics(workdir), times, f'{unit}_per_second', units_per_step,
                     start=trace.first_line(r'^(Starting from|Resumed from)') or trace.start)
  saves = [(t, float(m.group(1))) for t, message in records
           if (m := re.search(r'Finished blocking save in ([\d.]+) seconds', message))]
  saves += _save_waits(records)
  bounds = [('interpreter and imports', _first(records, 'Modules imported.')),
            ('config, mesh and data set-up', _first(records, 'CheckpointManager created')),
            (f'state init, restore check (init compile {compiled.get("<lambda>", 0):.1f} s)',
             trace.first_line(r'^(Starting from|Resumed from)'))]
  rows, at = [], trace.start
  for name, end in bounds:
    end = end or at
    rows.append((name, end - at, at, end))
    at = end
  if windows:
    first, rest = windows[0], windows[1:]
    rows.append((f'steps {first[0]}-{first[1]}: first step, loop set-up (train_step compile '
                 f'{compiled.get("train_step", 0):.1f} s)', first[2], at, at + first[2]))
    at += first[2]
    rows += _steady_rows(rest, saves, step_s, at, compiled.get('eval_step', 0.0))
    at = times[windows[-1][1]]
  summary = max((os.path.getmtime(os.path.join(workdir, name)) for name in
                 ('summary.json', 'report.png') if os.path.exists(os.path.join(workdir, name))),
                default=None)
  last_out = max((t for t, stream, _ in trace.lines if stream == 'out'), default=at)
  for name, end in (('end of run: test split, summary.json, report.png', summary),
                    ('end of run: the rest (samples: compile '
                     f'{sum(s for f, s in compiled.items() if "sample" in f):.1f} s)', last_out),
                    ('exit (teardown)', trace.end)):
    end = max(end or at, at)
    rows.append((name, end - at, at, end))
    at = end
  return rows, compiled, windows


def _save_waits(records):
  """(end, seconds) of each time the main thread waited for a checkpoint's write to finish."""
  waits, started = [], None
  for t, message in records:
    if 'Waiting for Save Finalize thread' in message:
      started = t
    elif 'Done waiting for Save Finalize thread' in message and started is not None:
      waits.append((t, t - started))
      started = None
  return waits


def _steady_rows(windows, saves, step_s, at, eval_compile):
  """The windows after the first: steps (the step and the host work around it), data wait,
  checkpoint saves (their blocking part) and evaluation."""
  if not windows:
    return []
  end = at + sum(w[2] for w in windows)
  steps = sum(w[1] - w[0] + 1 for w in windows)
  training = sum(w[3] for w in windows)
  waited = sum(w[4] for w in windows)
  saving = sum(s for t, s in saves if at < t <= end)
  evaluating = sum(w[2] - w[3] for w in windows)
  rows = []
  if step_s:
    rows.append((f'steady steps: {steps} x {step_s * 1e3:.2f} ms (the in-process step)',
                 steps * step_s, at, end))
    rows.append(('  host work between steps (dispatch, logged steps, progress bar)',
                 training - waited - saving - steps * step_s, at, end))
  else:
    rows.append((f'steady steps: {steps}, step and host work around it',
                 training - waited - saving, at, end))
  rows.append(('  waiting for data', waited, at, end))
  rows.append(('  checkpoint saves (blocking part and waits for writes)',
               saving, at, end))
  rows.append((f'  evaluation (eval_step compile {eval_compile:.1f} s)', evaluating, at, end))
  return rows
