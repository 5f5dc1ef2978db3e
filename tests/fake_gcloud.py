"""A fake `gcloud` for tests/test_tpu_scripts.py: it records every call as a JSON line and plays
a small cloud (TPU VMs, queued resources, preemptions); and a checker of each call against the
documented `gcloud compute tpus` syntax."""

import json
import os
import pathlib
import shlex
import sys
import subprocess
import textwrap

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / 'tpu_scripts'
ZONE = 'us-east5-a'
TRAIN_FLAGS = ['--workdir=gs://bucket/runs/8b', '--config=configs/default.py:llama3_8b',
               '--config.train.profile_steps=(100, 5)', "--config.data.files=it's *.txt"]

# The documented synopses (cloud.google.com/sdk/gcloud/reference/compute/tpus/...): required
# flags, and the flags each command takes. --project, --format and --quiet are gcloud-wide.
GLOBAL = {'--project', '--format', '--quiet'}
SYNTAX = {
    ('tpu-vm', 'create'): ({'--zone', '--version'},
                           {'--accelerator-type', '--spot', '--reserved', '--preemptible'}),
    ('tpu-vm', 'describe'): ({'--zone'}, set()),
    ('tpu-vm', 'delete'): ({'--zone'}, {'--async'}),
    ('tpu-vm', 'ssh'): ({'--zone'}, {'--worker', '--command', '--internal-ip'}),
    ('tpu-vm', 'scp'): ({'--zone'}, {'--worker', '--recurse', '--compress', '--internal-ip'}),
    ('queued-resources', 'create'): (
        {'--zone', '--runtime-version', '--accelerator-type'},
        {'--node-id', '--node-count', '--node-prefix', '--spot', '--reserved', '--guaranteed'}),
    ('queued-resources', 'describe'): ({'--zone'}, set()),
    ('queued-resources', 'delete'): ({'--zone'}, {'--force', '--async'}),
}
BOOLEAN = {'--spot', '--reserved', '--preemptible', '--quiet', '--async', '--force', '--recurse',
           '--compress', '--internal-ip', '--guaranteed'}
POSITIONALS = {'scp': 2}  # source and destination; every other command names one resource


def parse_call(argv):
  """(group, verb, positionals, {flag: value}) of `gcloud compute tpus GROUP VERB ...`."""
  assert argv[:2] == ['compute', 'tpus'], argv
  group, verb, rest = argv[2], argv[3], argv[4:]
  positionals = [a for a in rest if not a.startswith('--')]
  flags = dict((a.split('=', 1) + [None])[:2] for a in rest if a.startswith('--'))
  return group, verb, positionals, flags


def check_syntax(argv):
  """Fails unless argv is a documented `gcloud compute tpus` command."""
  group, verb, positionals, flags = parse_call(argv)
  assert (group, verb) in SYNTAX, argv
  required, optional = SYNTAX[group, verb]
  assert required <= flags.keys(), (argv, required - flags.keys())
  assert flags.keys() <= required | optional | GLOBAL, (argv, flags.keys() - required - optional)
  for flag, value in flags.items():
    assert (value is None) == (flag in BOOLEAN), f'{flag} takes {"no" if value else "a"} value'
  assert len(positionals) == POSITIONALS.get(verb, 1), argv
  assert not {'--spot', '--reserved'} <= flags.keys(), argv
  if (group, verb) == ('queued-resources', 'create'):  # --node-id | --node-count:--node-prefix
    assert ('--node-id' in flags) != ('--node-count' in flags), argv
    assert ('--node-count' in flags) == ('--node-prefix' in flags), argv
  if verb == 'ssh':
    assert flags.get('--worker') == 'all' or flags['--worker'].isdigit(), argv
    assert flags.get('--command'), argv


FAKE_GCLOUD = r'''
import fcntl, json, os, shlex, sys

home = os.environ['FAKE_CLOUD']
argv = sys.argv[1:]
with open(os.path.join(home, 'lock'), 'w') as lock:
  fcntl.flock(lock, fcntl.LOCK_EX)
  with open(os.path.join(home, 'calls.jsonl'), 'a') as calls:
    calls.write(json.dumps(argv) + '\n')
  with open(os.path.join(home, 'world.json')) as f:
    world = json.load(f)
  group, verb = argv[2], argv[3]
  flags = dict((a.split('=', 1) + [''])[:2] for a in argv[4:] if a.startswith('--'))
  positionals = [a for a in argv[4:] if not a.startswith('--')]
  name = positionals[0]
  nodes, queued = world['nodes'], world['queued']
  out, status = '', 0

  def train_behaviour(node, worker):
    """What train.py does on this worker's k-th launch: world['train'][k], then 'ok'."""
    runs = world['runs'].setdefault(f'{node}/{worker}', 0)
    world['runs'][f'{node}/{worker}'] = runs + 1
    script = world['train']
    return script[runs] if runs < len(script) else 'ok'

  def preempt(node):
    if world['on_preempt'] == 'gone':
      nodes.pop(node)
    else:
      nodes[node] = 'PREEMPTED'
    for qr in queued.values():
      if node in qr['nodes']:
        qr['state'] = 'SUSPENDED'

  if group == 'tpu-vm' and verb == 'create':
    if name in nodes:
      status = 1
    nodes[name] = 'READY'
  elif group == 'tpu-vm' and verb == 'describe':
    out, status = (nodes[name], 0) if name in nodes else ('', 1)
  elif group == 'tpu-vm' and verb == 'delete':
    status = 0 if nodes.pop(name, None) else 1
  elif group == 'queued-resources' and verb == 'create':
    count = int(flags.get('--node-count', 1))
    names = ([flags['--node-id']] if '--node-id' in flags else
             [f"{flags['--node-prefix']}-{i}" for i in range(count)])
    queued[name] = {'state': 'ACTIVE', 'nodes': names, 'pending': world['pending_describes']}
    nodes.update({n: 'READY' for n in names})
  elif group == 'queued-resources' and verb == 'describe':
    qr = queued.get(name)
    if qr and qr['pending']:
      qr['pending'] -= 1
      out = 'WAITING_FOR_RESOURCES'
    else:
      out, status = (qr['state'], 0) if qr else ('', 1)
  elif group == 'queued-resources' and verb == 'delete':
    qr = queued.pop(name, None)
    alive = qr and any(n in nodes for n in qr['nodes'])
    status = 1 if not qr or (alive and '--force' not in flags) else 0
    for n in (qr or {}).get('nodes', []):
      nodes.pop(n, None)
  elif verb in ('ssh', 'scp'):
    node = positionals[0 if verb == 'ssh' else 1].split(':')[0]
    words = shlex.split(flags.get('--command', ''))
    is_train = any(w == 'train.py' and words[i - 1].endswith('/python')
                   for i, w in enumerate(words))
    behaviour = train_behaviour(node, flags['--worker']) if is_train else None
    if nodes.get(node) != 'READY':
      status = 255
    elif is_train:
      flags_given = words[words.index('train.py') + 1:]
      out = f'fake train.py on {node} worker {flags["--worker"]}: {json.dumps(flags_given)}'
      if behaviour == 'preempt':
        preempt(node)
        status = 255
      elif behaviour == 'sigterm':  # train.py saves the step and exits PREEMPTED
        out += ('\nSIGTERM received: saved step 40 to gs://bucket/runs/8b/checkpoints/40; '
                'rerun to resume.')
        status = 75
      elif behaviour.startswith('exit'):
        status = int(behaviour[4:])
  else:
    status = 2
  with open(os.path.join(home, 'world.json'), 'w') as f:
    json.dump(world, f)
if out:
  print(out)
sys.exit(status)
'''


class FakeCloud:
  """A fake gcloud on PATH; `world` is what the cloud holds, `calls` what gcloud was asked."""

  def __init__(self, tmp_path, train=(), on_preempt='PREEMPTED', nodes=None, pending=0):
    self.dir = tmp_path
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    gcloud = bin_dir / 'gcloud'
    gcloud.write_text(f'#!{sys.executable}\n{textwrap.dedent(FAKE_GCLOUD)}')
    gcloud.chmod(0o755)
    (tmp_path / 'world.json').write_text(json.dumps({
        'nodes': nodes or {}, 'queued': {}, 'runs': {}, 'train': list(train),
        'on_preempt': on_preempt, 'pending_describes': pending}))
    (tmp_path / 'calls.jsonl').write_text('')
    self.env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                    FAKE_CLOUD=str(tmp_path), TMPDIR=str(tmp_path))

  def run(self, script, *args):
    return subprocess.run([str(SCRIPTS / script), *args], cwd=self.dir, env=self.env,
                          capture_output=True, text=True, timeout=60, check=False)

  @property
  def calls(self):
    lines = (self.dir / 'calls.jsonl').read_text().splitlines()
    calls = [json.loads(line) for line in lines]
    for call in calls:
      check_syntax(call)
    return calls

  @property
  def world(self):
    return json.loads((self.dir / 'world.json').read_text())


def slice_flags(accelerator, *extra, name='job'):
  return [f'--name={name}', f'--zone={ZONE}', f'--accelerator={accelerator}', *extra]


def verbs(calls):
  """Each call as 'group verb', e.g. 'tpu-vm create'."""
  return [' '.join(call[2:4]) for call in calls]


def is_train(call):
  command = parse_call(call)[3].get('--command', '')
  return call[3] == 'ssh' and 'exec ../podium-venv/bin/python train.py' in command


def train_calls(calls):
  return [c for c in calls if is_train(c)]


def positions(calls, predicate):
  return [i for i, call in enumerate(calls) if predicate(call)]


def train_argv(call):
  """train.py's flags as the worker's shell will pass them."""
  words = shlex.split(parse_call(call)[3]['--command'])
  return words[words.index('train.py') + 1:]
