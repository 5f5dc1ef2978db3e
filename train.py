"""Trains a model: `python train.py --workdir=DIR [--config=configs/default.py[:presets]]`.

Override any config key with `--config.<section>.<key>=<value>`. Rerunning the same command
resumes from the newest checkpoint in DIR. Config problems exit with status 2 and one line; the
exit statuses are in training/exit_codes.py. `--print_config` prints the resolved config (every
key, its value and its comment) and exits.

`--mode=evaluate --workdir=DIR [--split=validation|test] [--step=N|best]` evaluates one
checkpoint of DIR (the newest by default) with the run's own config and prints and writes
(DIR/evaluations/SPLIT-STEP.json) the task's eval figures; nothing is trained. `--merge_lora`
evaluates a LoRA run with its adapters merged into the kernels (SPLIT-STEP-merged.json).
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from hardware import console
from training import exit_codes

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
FLAGS = flags.FLAGS


def _usage_error(message: str):
  console.usage_error(message)


def _first_and_last_line(error: Exception) -> str:
  """Config-file errors arrive with a traceback inside; its last line says what went wrong."""
  lines = str(error).strip().splitlines()
  return lines[0] if len(lines) == 1 else f'{lines[0].split(":")[0]}: {lines[-1]}'



def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
  flags.DEFINE_string('coordinator_address', '',
                      'HOST:PORT of process 0 in a multi-process run off Cloud TPU (on a TPU '
                      'pod the hosts find each other).')
  flags.DEFINE_integer('num_processes', 0, 'Processes in the run, with --coordinator_address.')
  flags.DEFINE_integer('process_id', -1, 'This process, 0..num_processes-1.')
  flags.DEFINE_string('compile_cache', '',
                      "JAX's persistent compilation cache, so that a rerun (a resume after "
                      'preemption) loads the compiled train step instead of compiling it again. '
                      "Empty: $JAX_COMPILATION_CACHE_DIR if set (one cache for every run), else "
                      "WORKDIR/compile_cache; 'none': off.")
  flags.DEFINE_bool('compile_only', False,
                    'Compile the train step for --topology and report its memory; no training.')
  flags.DEFINE_string('topology', '', 'Cloud TPU topology for --compile_only, e.g. v5p-128, '
                      'v5e-16, v6e-8 or 2xv5e-16 (two slices).')
  flags.DEFINE_bool('plan', False, 'With --compile_only: try the remat, micro-batch, mesh and '
                    'loss-chunk settings, compile the most promising and print them ranked, with '
                    'the --config.* overrides of the best (training/plan.py).')
  flags.DEFINE_integer('plan_compiles', 2, 'With --plan: how many candidates to compile (each '
                       'may take minutes for a large model).')
  flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                    "evaluate: the task's eval figures for one checkpoint of --workdir, on "
                    "--split, and no training. The config is the run's WORKDIR/config.json "
                    'unless --config is given.')
  flags.DEFINE_enum('split', 'validation', ['validation', 'test'], 'The split --mode=evaluate '
                    'evaluates.')
  flags.DEFINE_string('step', '', "The checkpoint --mode=evaluate evaluates: a step, 'best' "
                      '(the one early stopping kept) or empty for the newest.')
  flags.DEFINE_bool('merge_lora', False, '--mode=evaluate of a LoRA run: with its adapters '
                    'merged into the kernels (as `python -m tools.hf export` writes them).')
  flags.DEFINE_bool('print_config', False, 'Print the resolved config (presets and --config.* '
                    'overrides applied): every key, its value and its comment; then exit.')
  try:  # config_flags may resolve `--config.a.b=` overrides against the config right here
    config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file[:presets].',
                                    lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key_error(e)


def _unknown_key_error(error: Exception):
  from data import sources  # pylint: disable=g-import-not-at-top; keeps --help fast
  for arg in sys.argv[1:]:
    old = arg.split('=')[0].removeprefix('--config.data.')
    if arg.startswith('--config.data.') and old in sources.RENAMED:
      _usage_error(f'--config.data.{old}: renamed --config.data.{sources.RENAMED[old]}')
  detail = error.args[0]
  while isinstance(detail, Exception):  # a KeyError wrapped in an AttributeError
    detail = detail.args[0]
  _usage_error(f'unknown config key {detail}')


def _parse_flags(argv):
  """absl's parser, with errors (bad types, unknown flags, bad files) as one line, status 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except; the config file may raise anything
    if _verbose():
      raise
    _config_file_error(e)
    if isinstance(e, flags.Error):
      _usage_error(_first_and_last_line(e))
    if isinstance(e, (AttributeError, KeyError)):  # an override of a key the config lacks
      _unknown_key_error(e)
    raise


def _loaded_config():
  try:
    FLAGS.config.keys()  # config_flags defers file-loading errors to first use
    return FLAGS.config
  except OSError as e:
    _usage_error(f'cannot load --config={config_flags.get_config_filename(FLAGS["config"])}: '
                 f'{str(e).strip().splitlines()[-1].strip()}')
  except Exception as e:  # pylint: disable=broad-except; the config file may raise anything
    _config_file_error(e)
    raise


def _verbose() -> bool:
  """--verbosity=1 or more (read from argv: the flags may not have parsed)."""
  return any(a.startswith(('--verbosity=', '-v=')) and a.split('=')[1] not in ('0', '-1', '-2')
             for a in sys.argv[1:])


def _config_named() -> bool:
  return any(a.startswith('--config=') for a in sys.argv[1:])


def _config_path() -> str:
  """The config file named on the command line (the last --config wins, as for any flag)."""
  named = [a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--config=')]
  return os.path.abspath(named[-1].split(':')[0]) if named else _DEFAULT_CONFIG


def _config_file_error(error: Exception):
  """A config file that does not import, or whose get_config raises, is bad input: one line
  naming the file, the line and the error (the traceback too with --verbosity=1 or more)."""
  if _verbose():
    return
  path = _config_path()
  if isinstance(error, SyntaxError) and os.path.abspath(error.filename or '') == path:
    line, what = error.lineno, error.msg
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == path]
    if not frames:
      return
    line, what = frames[-1].lineno, str(error).strip().splitlines()[-1:] or ['']
    what = what[0] if isinstance(what, list) else what
  _usage_error(f'--config={path}: line {line}: {type(error).__name__}: {what}')


def main(argv):
  if len(argv) > 1:
    _usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_libraries(console.verbose())
  config = _loaded_config()
  _resolve_choices(config)
  if FLAGS.print_config:
    _print_config(config)
  if FLAGS.compile_only:
    _compile_only(config)
  if FLAGS.plan:
    _usage_error('--plan needs --compile_only and --topology')
  if not FLAGS.workdir:
    _usage_error('flag --workdir must have a value')
  if FLAGS.mode == 'evaluate':
    if FLAGS.step not in ('', 'best') and not FLAGS.step.isdigit():
      _usage_error(f"--step={FLAGS.step}: a step number, 'best', or empty for the newest")
    config = _evaluated_config(config)
  # Read here, not by JAX at import: JAX would start its cache there before --compile_cache is set.
  shared_cache = os.environ.pop('JAX_COMPILATION_CACHE_DIR', '')
  from hardware import cpu_runtime  # pylint: disable=g-import-not-at-top
  from parallel import multihost, sharding  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # before JAX starts its backend; does nothing off CPU
  import jax  # pylint: disable=g-import-not-at-top; after flags, so --help stays fast
  from data import pipeline  # pylint: disable=g-import-not-at-top
  from hardware import paths  # pylint: disable=g-import-not-at-top
  from training import checkpointing, config_check, loop, warm_start  # pylint: disable=g-import-not-at-top
  logging.info('Modules imported.')  # a phase boundary, for benchmarks/whole_run.py
  workdir = paths.absolute(FLAGS.workdir)
  _resolve_paths(config, paths.absolute)
  try:
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    _usage_error(e)
  try:
    config_check.check_workdir(workdir)
    resolved = config_check.validate(config, jax.device_count(), jax.process_count(),
                                     sharding.num_slices(jax.devices()), jax.default_backend(),
                                     overridden=_overridden_keys())
    if FLAGS.mode == 'evaluate':
      _evaluate(config, workdir, resolved)
    _open_log(workdir)
    cache = _compile_cache(workdir, paths.absolute, shared_cache)
    status = loop.train(config, workdir, cache, resolved)
  except config_check.ConfigError as e:
    _usage_error(e if str(e).startswith('--') else f'config {e}')
  except (checkpointing.IncompatibleCheckpointError, checkpointing.NoUsableCheckpointError,
          warm_start.InitFromError, pipeline.UnusableDataError) as e:
    _usage_error(e)
  except loop.TrainingHalted as e:
    _halt(f'train.py: error: {e}')
  sys.exit(status)


def _resolve_choices(config):
  """Only the chosen entries' keys stay (config.json and --print_config show what the run
  reads), after the error for a key set that they do not read."""
  from training import config_check  # pylint: disable=g-import-not-at-top
  try:
    config_check.keep_chosen(config, _overridden_keys())
  except config_check.ConfigError as e:
    _usage_error(f'config {e}')


def _resolve_paths(config, absolute):
  """The config's local paths made absolute once, here (`absolute`: hardware.paths.absolute):
  Orbax and TensorStore refuse relative ones, and config.json must name the folders meant."""
  config.init_from = absolute(config.init_from)
  data = config.data
  for key in ('path', 'files', 'tfds_data_dir'):
    if key in data:
      data[key] = absolute(data[key])
  if data.get('tokenizer', '').endswith(('.model', '.json')):
    data.tokenizer = absolute(data.tokenizer)
  if data.get('mixture'):
    from data import sources  # pylint: disable=g-import-not-at-top
    try:
      parts = sources.parse_mixture(data.mixture)
    except ValueError:
      return  # the config check names the problem
    data.mixture = ','.join(f'{absolute(path)}:{weight!r}' for path, weight in parts)


def _open_log(workdir: str):
  """The full log goes to WORKDIR/logs/ on every host (a refusal later removes it again)."""
  try:
    console.log_to_file(workdir, 'train')
  except OSError as e:  # under a file, on a read-only disk, in /proc, ...
    _usage_error(f'--workdir: cannot create {workdir}: {e.strerror or type(e).__name__}')


def _compile_cache(workdir: str, absolute, shared_cache: str) -> str | None:
  """--compile_cache as a directory, or None for 'none'. JAX's own variable, when set, names a
  cache the user shares between runs: it wins over the workdir's."""
  if FLAGS.compile_cache == 'none':
    return None
  chosen = FLAGS.compile_cache or shared_cache
  return absolute(chosen) or f'{workdir.rstrip("/")}/compile_cache'


def _print_config(config):
  from training import config_doc  # pylint: disable=g-import-not-at-top
  print(config_doc.print_config(config, config_flags.get_config_filename(FLAGS['config'])))
  sys.exit(0)


def _usage() -> str:
  """--help's text: this file's docstring and the experiments to choose from."""
  from training import config_doc  # pylint: disable=g-import-not-at-top
  return (f'{__doc__}\nExperiment configs, --config=FILE[:preset,preset...] (presets combine in '
          f'any order;\nsee every key of one with --print_config), in {config_doc.CONFIGS}:\n'
          f'{config_doc.experiments()}\n')


def _overridden_keys() -> set[str]:
  """The config keys set on the command line (`--config.optim.name=sgd` -> 'optim.name')."""
  return set(config_flags.get_override_values(FLAGS['config']))


def _compile_only(config):
  """Compiles the train step for a TPU topology from this host and exits with its verdict."""
  if not FLAGS.topology:
    _usage_error('--compile_only needs --topology, e.g. --topology=v5p-128')
  console.require('libtpu', 'tpu', '--compile_only')
  from training import aot, plan  # pylint: disable=g-import-not-at-top
  from training import config_check  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.plan:
      sys.exit(plan.run(config, FLAGS.topology, _overridden_keys(), FLAGS.plan_compiles))
    sys.exit(aot.run(config, FLAGS.topology, _overridden_keys()))
  except config_check.ConfigError as e:
    _usage_error(e)


def _evaluated_config(config):
  """--mode=evaluate's config: the run's own, unless --config names one; with an eval set
  even if the run evaluated never (tasks build none for train.eval_every=0)."""
  if not _config_named():
    config = _saved_config()
  with config.unlocked():
    config.train.eval_every = max(config.train.eval_every, 1)
  return config


def _saved_config():
  """The run's WORKDIR/config.json (overrides need the --config they apply to)."""
  if any(a.startswith('--config.') for a in sys.argv[1:]):
    _usage_error('--config.* overrides need --config=FILE with --mode=evaluate (without it the '
                 "config is the run's WORKDIR/config.json)")
  from configs import saved  # pylint: disable=g-import-not-at-top
  from hardware import paths  # pylint: disable=g-import-not-at-top
  try:
    return saved.load(paths.absolute(FLAGS.workdir))
  except ValueError as e:
    _usage_error(e)


def _evaluate(config, workdir: str, resolved):
  """Prints and writes the eval figures of the checkpoint --step picks, then exits 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from training import evaluate  # pylint: disable=g-import-not-at-top
  try:
    result = evaluate.evaluate(config, workdir, FLAGS.split, FLAGS.step, resolved,
                               FLAGS.merge_lora)
  except evaluate.EvaluateError as e:
    _usage_error(e)
  if jax.process_index() == 0:
    figures = '  '.join(f'{k} {v:.4f}' for k, v in result.items()
                        if k not in ('split', 'step', 'checkpoint'))
    print(f"{FLAGS.split} split, step {result['step']} ({result['checkpoint']}): {figures}")
  sys.exit(exit_codes.DONE)


def _halt(message: str):
  """Prints `message` as the last line and exits 1, after checkpoints and metrics are closed.

  A checkpoint write that failed (disk full) leaves errors in Orbax's and TensorStore's threads
  that nobody awaits; they print tracebacks, from Python and from C++, until the process is gone.
  So stdout and stderr are pointed at /dev/null at the file-descriptor level first, the message
  goes to the real stderr on a line of its own, and the process exits without teardown.
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  for fd in (1, 2):
    os.dup2(devnull, fd)
  os.write(stderr, f'\n{message}\n'.encode())
  os._exit(exit_codes.FAILED)  # pylint: disable=protected-access

if __name__ == '__main__':
  __doc__ = _usage()  # what absl's --help prints  # pylint: disable=redefined-builtin
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
