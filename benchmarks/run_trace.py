"""One process run from outside: wall time, CPU time and memory over time, and its output lines.

`trace(command, cwd, env)` starts `command`, samples the resident memory of it and of every
process it started (Grain's workers, say: the memory only they hold, so a forked child is not
counted twice) and their CPU time from `/proc` every `interval` seconds on a thread,
stamps each line it prints (stdout and stderr; a progress bar's `\r` updates count as lines)
with the wall-clock time it arrived, and returns a `Trace` once the process has exited. CPU time
and the kernel's own peak RSS come from `wait4`, so nothing is missed between samples.
Linux only (`/proc`).
"""

import dataclasses
import os
import re
import subprocess
import threading
import time

_KIB = 1024


@dataclasses.dataclass
class Trace:
  start: float  # time.time() just before the process started
  end: float  # ... once it had exited
  status: int
  cpu_s: float  # user + system, of the process and the children it waited for
  peak_rss_mib: float  # the kernel's high-water mark (ru_maxrss) of the largest process
  samples: list  # (time, RSS in MiB, CPU seconds so far) of the process and its descendants
  lines: list  # (time, 'out' | 'err', text)

  @property
  def wall_s(self) -> float:
    return self.end - self.start

  def peak_between(self, start: float, end: float) -> float:
    """The largest sampled RSS (MiB) from `start` to `end`, or the nearest sample before."""
    inside = [rss for t, rss, _ in self.samples if start <= t <= end]
    before = [rss for t, rss, _ in self.samples if t < start]
    return max(inside) if inside else (before[-1] if before else float('nan'))

  def cpu_between(self, start: float, end: float) -> float:
    """CPU seconds the process tree used from `start` to `end` (from the samples)."""
    at = lambda when: max((cpu for t, _, cpu in self.samples if t <= when), default=0.0)
    return at(end) - at(start)

  def first_line(self, pattern: str, after: float = 0.0):
    """The time of the first printed line matching `pattern` (a regex) after `after`; None."""
    regex = re.compile(pattern)
    return next((t for t, _, text in self.lines if t > after and regex.search(text)), None)

  def text(self) -> str:
    return '\n'.join(text for _, _, text in self.lines)


def _status_kib(pid: int, field: str) -> int:
  try:
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
      for line in f:
        if line.startswith(field):
          return int(line.split()[1])
  except (OSError, ValueError):
    pass
  return 0


def _cpu_seconds(pid: int) -> float:
  """utime + stime of `pid` and the children it has waited for, from /proc/PID/stat."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return 0.0
  return sum(int(x) for x in fields[11:15]) / os.sysconf('SC_CLK_TCK')


def _private_kib(pid: int) -> int:
  """Memory only `pid` holds (a forked child shares its parent's pages until it writes them)."""
  try:
    with open(f'/proc/{pid}/smaps_rollup', encoding='ascii') as f:
      return sum(int(line.split()[1]) for line in f if line.startswith('Private_'))
  except (OSError, ValueError):
    return 0


def _descendants(pid: int) -> list[int]:
  """`pid` and every process below it (from /proc/PID/task/*/children)."""
  found, queue = [], [pid]
  while queue:
    current = queue.pop()
    found.append(current)
    try:
      for task in os.listdir(f'/proc/{current}/task'):
        with open(f'/proc/{current}/task/{task}/children', encoding='ascii') as f:
          queue += [int(c) for c in f.read().split()]
    except OSError:
      continue
  return found


def _sample(pid: int, samples: list, done: threading.Event, interval: float):
  while not done.is_set():
    tree = _descendants(pid)
    rss = _status_kib(pid, 'VmRSS:') + sum(_private_kib(p) for p in tree[1:])
    if rss:
      samples.append((time.time(), rss / _KIB, sum(_cpu_seconds(p) for p in tree)))
    done.wait(interval)


def _read_lines(stream, name: str, lines: list, echo):
  """Appends (time, name, line) per line; `\r` ends a line too (progress bars)."""
  pending = b''
  while chunk := os.read(stream.fileno(), 65536):
    now = time.time()
    pending += chunk
    *whole, pending = re.split(rb'[\r\n]', pending)
    for line in whole:
      if line.strip():
        text = line.decode('utf-8', 'replace')
        lines.append((now, name, text))
        if echo:
          echo(text)
  if pending.strip():
    lines.append((time.time(), name, pending.decode('utf-8', 'replace')))


def trace(command: list[str], cwd: str, env: dict, interval: float = 0.05,
          echo=None) -> Trace:
  """Runs `command` to its end (see the module docstring); `echo(line)` sees each line."""
  samples, lines, done = [], [], threading.Event()
  start = time.time()
  process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  threads = [threading.Thread(target=_sample, args=(process.pid, samples, done, interval)),
             threading.Thread(target=_read_lines, args=(process.stdout, 'out', lines, echo)),
             threading.Thread(target=_read_lines, args=(process.stderr, 'err', lines, echo))]
  for thread in threads:
    thread.start()
  _, status, usage = os.wait4(process.pid, 0)
  end = time.time()
  process.returncode = os.waitstatus_to_exitcode(status)
  done.set()
  for thread in threads:
    thread.join()
  lines.sort(key=lambda line: line[0])
  return Trace(start, end, process.returncode, usage.ru_utime + usage.ru_stime,
               usage.ru_maxrss / _KIB, samples, lines)


def uptime() -> str:
  """The load average (1, 5, 15 minutes), to print beside timings on a shared machine."""
  with open('/proc/loadavg', encoding='ascii') as f:
    return 'load ' + ' '.join(f.read().split()[:3])
