"""Where a whole `train.py` run's wall time and memory go, and how it compares end to end.

  python benchmarks/whole_run.py [--job=default|char|fashion_mnist_cnn | --config=FILE[:presets]]
      [--steps=N] [--workdir=DIR] [--data=tinyshakespeare.txt] [-- --config.x=y ...]
  python benchmarks/whole_run.py --job=char --vs_reference --nanogpt=PATH [--pairs=3]
  python benchmarks/whole_run.py --job=fashion_mnist_cnn --vs_reference

Runs `python train.py --workdir=... --config=...` in a subprocess, the way a user does (with
JAX_LOG_COMPILES=1 so that each compile is in its log file), samples the resident memory of
it and its children from /proc, and prints, per phase, the wall seconds, their share and the
peak RSS (run_phases.py says where each boundary comes from). Before the run it times the
same config's train step in a process of its own (benchmarks/step_time.py --config=...), so
the steady steps split into "the step" and the host work around it.

Jobs: `default` is configs/default.py; `char` is the char-level GPT of issue 22 (4 layers,
4 heads, 128 wide, MLP 512, sequence 64, batch 12, AdamW 1e-3 b2 0.99, warmup 100, cosine to
0.1, 2000 steps, evaluation every 250 steps over 20 batches, a checkpoint at each evaluation)
on --data's characters (as bytes: 90% train, 10% validation, as nanoGPT splits them);
`fashion_mnist_cnn` is configs/fashion_mnist_cnn.py (10 epochs).

--vs_reference runs the reference job alongside, alternating, --pairs times, and prints the
wall, CPU time and peak RSS ratios (podium / reference) with `uptime`'s load: for `char`
nanoGPT's README CPU command (--nanogpt: a checkout of karpathy/nanoGPT, copied to the
workdir, its data prepared there from --data), for `fashion_mnist_cnn`
benchmarks/torch_cnn_reference.py --train (needs torch). Prints figures only.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import zlib

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_phases, run_trace  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JOB = flags.DEFINE_enum('job', 'default', ['default', 'char', 'fashion_mnist_cnn'],
                         'Which job (see the docstring); --config replaces its config file.')
_CONFIG = flags.DEFINE_string('config', '', "A config file[:presets] instead of the job's.")
_STEPS = flags.DEFINE_integer('steps', 0, "train.steps (0: the job's own).")
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/podium_whole_run', 'Scratch folder: emptied.')
_DATA = flags.DEFINE_string('data', '/work/shared/data/tinyshakespeare.txt',
                            'tiny-shakespeare, for --job=char.')
_STEP_TIME = flags.DEFINE_bool('step_time', True, 'Time the in-process step first.')
_VS = flags.DEFINE_bool('vs_reference', False, 'Alternate with the reference job.')
_PAIRS = flags.DEFINE_integer('pairs', 1, 'Alternating (podium, reference) pairs.')
_NANOGPT = flags.DEFINE_string('nanogpt', '', 'A karpathy/nanoGPT checkout, for --job=char.')
_REPO = flags.DEFINE_string('repo', REPO, 'The podium checkout whose train.py runs (before/after '
                            'comparisons: e.g. a worktree of main).')
_ECHO = flags.DEFINE_bool('echo', False, "Print the run's own lines as they come.")

_CONFIGS = {'default': 'configs/default.py', 'char': 'configs/default.py',
            'fashion_mnist_cnn': 'configs/fashion_mnist_cnn.py'}
_CHAR = ('model.num_layers=4', 'model.num_heads=4', 'model.num_kv_heads=4',
         'model.embed_dim=128', 'model.mlp_dim=512', 'model.max_len=64', 'data.seq_len=64',
         'data.global_batch_size=12', 'optim.learning_rate=0.001', 'optim.adamw.b2=0.99',
         'optim.warmup_steps=100', 'optim.schedule=cosine', 'optim.final_lr_fraction=0.1',
         'train.steps=2000', 'train.eval_every=250', 'task.eval_batches=20',
         'train.checkpoint_every=250', 'data.source=files')


def fail(message: str):
  print(f'whole_run.py: {message}', file=sys.stderr)
  sys.exit(2)


def char_files(data: str, directory: str) -> list[str]:
  """--data split 90/10 into two files whose names put the second in the validation split
  (data.validation_percent over a hash of the name): the train.py flags that read them."""
  if not os.path.exists(data):
    fail(f'--data={data} does not exist; point it at tiny-shakespeare (1,115,394 bytes)')
  with open(data, 'rb') as f:
    text = f.read()
  os.makedirs(directory, exist_ok=True)
  cut = int(len(text) * 0.9)
  hashed = lambda name: zlib.crc32(f'{os.path.basename(directory)}/{name}'.encode()) % 100
  val = next(f'val{i}.txt' for i in range(100) if hashed(f'val{i}.txt') < hashed('train.txt'))
  for name, part in (('train.txt', text[:cut]), (val, text[cut:])):
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(part)
  return [f'data.files={directory}/*.txt', f'data.validation_percent={hashed(val) + 1}']


def train_flags(workdir: str, extra: list[str]) -> list[str]:
  """The train.py flags of the chosen job, --steps and the passthrough flags, in that order."""
  overrides = []
  if _JOB.value == 'char':
    overrides += [*_CHAR, *char_files(_DATA.value, os.path.join(workdir, 'char_data'))]
  if _STEPS.value:
    overrides.append(f'train.steps={_STEPS.value}')
  config = _CONFIG.value or os.path.join(_REPO.value, _CONFIGS[_JOB.value])
  return [f'--config={config}', *[f'--config.{o}' for o in overrides], *extra]


def child_env() -> dict:
  """The run's environment: every compile logged, and no shared compile cache (a cold run)."""
  env = {**os.environ, 'PYTHONPATH': _REPO.value, 'JAX_LOG_COMPILES': '1'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def step_seconds(flags_: list[str]) -> float | None:
  """The config's in-process step time (benchmarks/step_time.py, its own process), or None."""
  command = [sys.executable, os.path.join(REPO, 'benchmarks', 'step_time.py'),
             *[f for f in flags_ if f.startswith('--config')], '--steps=30']
  done = subprocess.run(command, cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO},
                        capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.strip().startswith('step ') and 'median' in line:
      print(f'in-process step (benchmarks/step_time.py): {line.strip()}')
      return float(line.split('median')[1].split('ms')[0]) / 1e3
  print(f'(no in-process step time: {done.stderr.strip().splitlines()[-1:]})')
  return None


def run_podium(workdir: str, extra: list[str]):
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  flags_ = train_flags(workdir, extra)
  command = [sys.executable, os.path.join(_REPO.value, 'train.py'), f'--workdir={workdir}/run',
             *flags_]
  trace = run_trace.trace(command, _REPO.value, child_env(), echo=print if _ECHO.value else None)
  if trace.status != 0:
    print(trace.text()[-3000:])
    fail(f'train.py exited with status {trace.status}: {" ".join(command)}')
  return trace, flags_


def units(workdir: str) -> tuple[int, str]:
  """(units per step, unit) of the run: tokens for language models, else examples."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  record = run_phases.metrics(workdir)[-1]
  unit = next(k[:-len('_per_second')] for k in record
              if k.endswith('_per_second') and '/' not in k)
  batch = config['data']['global_batch_size']
  return (batch * config['data']['seq_len'] if unit == 'tokens' else batch), unit


def print_table(trace, workdir: str, step_s):
  per_step, unit = units(workdir)
  rows, compiled, windows = run_phases.phases(trace, workdir, per_step, unit, step_s)
  print(f'\n{"phase":<66} {"wall s":>8} {"share":>6} {"CPU s":>7} {"peak RSS MiB":>12}')
  for name, seconds, start, end in rows:
    whole = not name.startswith('  ')  # sub-rows share their parent's interval
    cpu = f'{trace.cpu_between(start, end):7.1f}' if whole else ''
    peak = f'{trace.peak_between(start, end):12.0f}' if whole else ''
    print(f'{name:<66} {seconds:8.2f} {seconds / trace.wall_s:6.1%} {cpu:>7} {peak}')
  print(f'{"total: the sum of the rows":<66} {sum(r[1] for r in rows):8.2f}')
  print(f'{"measured wall":<66} {trace.wall_s:8.2f}  CPU {trace.cpu_s:.1f} s, peak RSS '
        f'{trace.peak_rss_mib:.0f} MiB (kernel high-water mark)')
  print('compiles (tracing + lowering + XLA), s: ' +
        ', '.join(f'{name} {s:.2f}' for name, s in sorted(compiled.items(), key=lambda x: -x[1])
                  if s >= 0.05) + f'; all {sum(compiled.values()):.2f}')
  if len(windows) > 1 and step_s:
    steady = [(w[3] - w[4]) / (w[1] - w[0] + 1) for w in windows[1:]]
    print(f'run step time (window training time less data wait, per step): median '
          f'{statistics.median(steady) * 1e3:.2f} ms, best {min(steady) * 1e3:.2f} ms, worst '
          f'{max(steady) * 1e3:.2f} ms; in-process {step_s * 1e3:.2f} ms')


def _run_and_print(workdir: str, extra: list[str]):
  trace, _ = run_podium(workdir, extra)
  print_table(trace, f'{workdir}/run', None)
  return trace


def main(argv):
  extra = argv[1:]
  workdir = os.path.abspath(_WORKDIR.value)
  if _VS.value:
    from benchmarks import whole_run_reference  # pylint: disable=g-import-not-at-top
    whole_run_reference.compare(_JOB.value, workdir, _PAIRS.value,
                                lambda directory: _run_and_print(directory, extra),
                                _NANOGPT.value, _DATA.value, _STEPS.value)
    return
  print(f'{run_trace.uptime()}, {os.cpu_count()} CPUs')
  step_s = step_seconds(train_flags(workdir, extra)) if _STEP_TIME.value else None
  trace, flags_ = run_podium(workdir, extra)
  print(f'python train.py --workdir={workdir}/run {" ".join(flags_)}  ({run_trace.uptime()})')
  print_table(trace, f'{workdir}/run', step_s)


if __name__ == '__main__':
  app.run(main)
