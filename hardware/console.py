"""What podium's tools print: their own lines on the terminal, every library's log in a file.

Each tool (train.py, tools.sample, tools.hf, prepare) calls, once, in its `main`:

  console.quiet_libraries(console.verbose())  # first, before JAX starts a backend
  ...
  console.log_to_file(workdir, 'train')       # once it knows where its run lives

Quiet (the default), the terminal shows the tool's output and podium's warnings; library INFO
lines and the known-harmless warnings in `HARMLESS` appear only with `--verbosity=1`. libtpu,
loaded on a host without TPU chips to compile for a topology, is told that this host is the
whole (one-worker) job, so it does not report the metadata server it cannot reach. The log file
(WORKDIR/logs/PROGRAM.HOST.TIME.PID.log, one per process and attempt, on every host) takes every
record at the logging verbosity (INFO unless `--verbosity` says otherwise), quiet or not,
including those logged before it was opened; in a bucket it is rewritten whole every minute.

Bad input is one line on stderr and exit status 2 (`usage_error`, and `parse_flags` for absl's
own flag errors); a missing optional
dependency is such a line naming the extra that installs it (`require`). This sits in the
lowest layer so that every layer's tools (prepare too) can use it.
"""

import atexit
import contextlib
import datetime
import importlib
import logging as python_logging
from logging import handlers as logging_handlers
import os
import socket
import sys
import tempfile
import time
from typing import NoReturn

from absl import flags, logging

# Warnings libraries print on runs that work (message substrings), shown with --verbosity=1.
HARMLESS = (
    # Orbax, reading a checkpoint saved without its metadata file (a params-only import).
    'Metadata file does not exist',
    # Apache Beam: without its GCP extra, on local files; in each worker process (podium stages
    # no files); with --workers (podium starts the worker processes itself).
    'apitools not found',
    'No semi_persistent_directory found',
    'direct_running_mode should be',
)
# libtpu on a host with no TPU chips: one host, one worker, no metadata server to ask.
_LIBTPU_ALONE = {'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_HOST_BOUNDS': '1,1,1'}

_early_records = None  # records logged before log_to_file, handed to the file when it opens


class _DropHarmless(python_logging.Filter):

  def filter(self, record):
    return record.levelno >= python_logging.ERROR or not any(
        text in record.getMessage() for text in HARMLESS)


def verbose() -> bool:
  """Whether --verbosity (absl's flag) asks for library logs: 1 or more, once flags are parsed."""
  return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1


def quiet_libraries(verbose: bool) -> None:  # pylint: disable=redefined-outer-name
  """Keeps library logs off the terminal unless `verbose`; call once, first thing in `main`
  (after absl parsed the flags, before JAX starts a backend)."""
  global _early_records
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _DropHarmless)]:
    handler.removeFilter(old)
  handler.setLevel(python_logging.NOTSET)
  if not verbose:
    handler.setLevel(python_logging.WARNING)
    handler.addFilter(_DropHarmless())
    from hardware import cpu_runtime  # pylint: disable=g-import-not-at-top; it imports jax
    if not cpu_runtime.tpu_chips_present():
      for name, value in _LIBTPU_ALONE.items():
        os.environ.setdefault(name, value)
  if _early_records is None:
    _early_records = logging_handlers.MemoryHandler(
        capacity=1 << 30, flushLevel=python_logging.CRITICAL + 1, flushOnClose=False)
    python_logging.root.addHandler(_early_records)


def log_to_file(workdir: str, program: str) -> str:  # pylint: disable=redefined-outer-name
  """Writes the log from now on (and the records logged before) to a new file in
  `workdir`/logs/, whose path it returns. In a bucket (gs://) the file is written locally and
  copied there whole every `MIRROR_SECONDS` and at exit (objects cannot be appended to).
  `usage_error` removes the file again, and the folders made for it: a refusal leaves no trace."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  global _early_records, _log
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  logs = epath.Path(workdir) / 'logs'
  path = logs / f'{program}.{socket.gethostname()}.{stamp}.{os.getpid()}.log'
  if '://' in workdir:
    handler = _MirroredFile(os.path.join(tempfile.mkdtemp(prefix='podium-logs-'), path.name), path)
    handler.mirror()  # which loads the bucket's file system, so its exit hooks run after ours
    atexit.register(handler.close)
  else:
    made, existing = [], logs
    while not existing.exists():
      made.append(existing)
      existing = existing.parent
    times = os.stat(existing).st_atime_ns, os.stat(existing).st_mtime_ns
    logs.mkdir(parents=True, exist_ok=True)
    handler = python_logging.FileHandler(path, encoding='utf-8')
    handler.made, handler.touched = made, (existing, times)  # for _discard_log
  handler.setFormatter(logging.PythonFormatter())
  if _early_records is not None:
    _early_records.setTarget(handler)
    _early_records.flush()
    python_logging.root.removeHandler(_early_records)
    _early_records = None
  python_logging.root.addHandler(handler)
  _log = handler
  return str(path)


MIRROR_SECONDS = 60
_log = None  # the handler log_to_file added


class _MirroredFile(python_logging.FileHandler):
  """A local log file copied whole to `remote` as records arrive, at most every
  MIRROR_SECONDS, and when closed."""

  def __init__(self, local: str, remote):
    super().__init__(local, encoding='utf-8')
    self.remote, self.copied, self.failed = remote, time.monotonic(), False

  def emit(self, record):
    super().emit(record)
    if time.monotonic() - self.copied > MIRROR_SECONDS:
      self.mirror()

  def close(self):
    was_open = self.stream is not None
    super().close()
    if was_open and self is _log:
      self.mirror()

  def mirror(self):
    self.copied = time.monotonic()
    try:
      with open(self.baseFilename, 'rb') as f:
        self.remote.write_bytes(f.read())
    except Exception as e:  # pylint: disable=broad-except; the run's result stands regardless
      if not self.failed:
        sys.stderr.write(f'{program()}: the log stays at {self.baseFilename}: cannot write '
                         f'{self.remote}: {e}\n')
      self.failed = True


def _discard_log():
  """Removes the log file and the folders made for it, and puts back the modification time of
  the folder it went in."""
  global _log
  handler, _log = _log, None
  if handler is None:
    return
  python_logging.root.removeHandler(handler)
  handler.close()
  with contextlib.suppress(OSError):
    os.remove(handler.baseFilename)
    if isinstance(handler, _MirroredFile):
      handler.remote.unlink(missing_ok=True)
      return
    for folder in handler.made:  # deepest first
      os.rmdir(folder)
    os.utime(handler.touched[0], ns=handler.touched[1])


def program() -> str:
  """The running tool as typed: 'train.py', 'tools.sample' for `python -m tools.sample`,
  'prepare' for `python -m prepare` (a package's __main__)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name.removesuffix('.__main__') if spec else os.path.basename(sys.argv[0])


def usage_error(message) -> NoReturn:
  """Bad input: one line on stderr naming what is wrong and the fix, exit status 2; the log
  file of this attempt is removed (a refused run writes nothing)."""
  _discard_log()
  sys.stderr.write(f'{program()}: error: {" ".join(str(message).split())}\n')
  sys.exit(2)  # training/exit_codes.py: BAD_INPUT


def parse_flags(argv):
  """absl's flag parsing with its errors (unknown flag, bad value, missing required flag) as
  `usage_error`s: pass as `app.run(main, flags_parser=console.parse_flags)`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(e)


def require(module: str, extra: str, purpose: str) -> None:
  """Exits as `usage_error` with the install line unless `module` imports (a missing or a broken
  install alike); `purpose`: what needs it, e.g. '--compile_only' or 'python -m prepare'."""
  try:
    importlib.import_module(module)
  except ImportError:
    usage_error(f'{purpose} needs {install_hint(module, extra)}')


def install_hint(module: str, extra: str) -> str:
  """How to get `module`, for messages that say what needs it (see `require`)."""
  return f"{module}, from podium's {extra} extra: pip install -e '.[{extra}]'"
