"""A run with everything in a GCS bucket: workdir, checkpoints, compile cache and data.

The bucket is served on 127.0.0.1 by gcp-storage-emulator (tests/gcs_emulator.py); train.py
finds it through the variables in `_emulator_env`. This process reads the bucket with its own
gcsfs client, and copies a run down to check it with the local helpers.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from data import sources, tokenizers
from tests.test_faults import _assert_same_state, _losses
from tests.test_prepared_data import write_prepared
from tests.test_train_e2e import REPO, TINY, run_train
from tests.test_train_e2e import saved_state as _state

pytest.importorskip('gcsfs', reason='gs:// needs gcsfs: pip install -e .[tpu]')
pytest.importorskip('gcp_storage_emulator',
                    reason='the GCS emulator is not installed: pip install -e .[test]')
from gcsfs.core import GCSFileSystem  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = 'bkt'
STEPS = 16
# Dropout on, so its random stream must resume exactly too.
RUN = [f'--config.train.steps={STEPS}', '--config.train.checkpoint_every=4',
       '--config.train.eval_every=8', '--config.task.num_samples=0',
       '--config.model.dropout_rate=0.1', '--config.data.validation_percent=25']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _emulator_env(url: str) -> dict:
  return {'STORAGE_EMULATOR_HOST': url,  # gcsfs (epath) and google-cloud-storage (tensorboardX)
          'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # Orbax
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # ArrayRecord's reader (google-cloud-cpp)
          # Otherwise google-auth looks for a GCE metadata server, and stalls each access.
          'NO_GCE_CHECK': 'True', 'GCE_METADATA_HOST': '127.0.0.1:9',
          # Otherwise gcsfs asks the bucket's layout of a gRPC API the emulator lacks, waiting
          # 30 s or more before each access.
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


def _wait_until_serving(url: str, server: subprocess.Popen):
  deadline = time.time() + 30
  while time.time() < deadline and server.poll() is None:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=1).close()
      return
    except OSError:
      time.sleep(0.1)
  raise AssertionError(f'the GCS emulator did not start (exit status {server.poll()})')


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  """(gcsfs client, environment for train.py) for a fresh in-memory bucket BUCKET."""
  url = f'http://127.0.0.1:{_free_port()}'
  log = open(tmp_path_factory.mktemp('emulator') / 'log', 'w', encoding='utf-8')
  server = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'gcs_emulator.py'), url.rsplit(':', 1)[1],
       BUCKET], stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_until_serving(url, server)
    # gcsfs's plain HTTP client (see GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT), listing afresh each time:
    # it polls a bucket that train.py writes.
    client = GCSFileSystem(endpoint_url=url, token='anon', skip_instance_cache=True,
                           use_listings_cache=False)
    yield client, _emulator_env(url)
  finally:
    server.kill()
    server.wait()
    log.close()


def _documents() -> dict[str, bytes]:
  """Text files named so that both splits get some at validation_percent=25."""
  names = [f'doc{i:02d}.txt' for i in range(12)]
  eval_names = sources.split_files([f'data/{n}' for n in names], 'validation', 25)
  assert 0 < len(eval_names) < len(names)
  return {n: (f'document {n}: ' + 'the quick brown fox jumps over the lazy dog. ' * (20 + i))
              .encode() for i, n in enumerate(names)}


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  """The same run, uninterrupted, all on local disk (files under .../data/, as in the bucket:
  the split hashes a file's folder and name)."""
  root = tmp_path_factory.mktemp('local')
  (root / 'data').mkdir()
  for name, text in _documents().items():
    (root / 'data' / name).write_bytes(text)
  result = run_train(root / 'run', *RUN, '--config.data.source=files',
                     f'--config.data.files={root}/data/*.txt')
  assert result.returncode == 0, result.stderr
  return root / 'run'


def _train_in_bucket(env, cwd) -> subprocess.Popen:
  command = [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir=gs://{BUCKET}/run',
             f'--compile_cache=gs://{BUCKET}/cache', *TINY, *RUN, '--config.data.source=files',
             f'--config.data.files=gs://{BUCKET}/data/*.txt']
  return subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(client, step, process, timeout=300):
  """Until the checkpoint of `step` is complete: on GCS, Orbax marks that with a file in it."""
  marker = f'{BUCKET}/run/checkpoints/{step}/commit_success.txt'
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if client.exists(marker):
      return
    time.sleep(0.1)
  raise AssertionError(f'no checkpoint at step {step}: {process.communicate()[1][-3000:]}')


def test_killed_and_resumed_run_in_a_bucket_matches_a_local_run(bucket, unbroken, tmp_path):
  client, env = bucket
  for name, text in _documents().items():
    client.pipe(f'{BUCKET}/data/{name}', text)
  cwd = tmp_path / 'cwd'  # where a gs:// path taken for a local one would land
  cwd.mkdir()

  first = _train_in_bucket(env, cwd)
  _wait_for_checkpoint(client, 4, first)
  assert first.poll() is None, 'the run ended before it could be killed'
  first.send_signal(signal.SIGKILL)
  first.communicate()
  second = _train_in_bucket({**env, 'JAX_LOG_COMPILES': '1'}, cwd)  # logs cache hits by name
  out, err = second.communicate(timeout=600)
  assert second.returncode == 0, err

  assert 'Resumed from the checkpoint at step' in out
  assert "Persistent compilation cache hit for 'jit_train_step'" in err
  assert client.find(f'{BUCKET}/cache')
  assert not os.listdir(cwd)
  local = tmp_path / 'copy'
  client.get(f'{BUCKET}/run', str(local), recursive=True)
  assert (local / 'config.json').exists() and (local / 'metrics' / '00000.jsonl').exists()
  logs = sorted((local / 'logs').glob('train.*.log'))  # the killed run's and the resumed one's
  assert len(logs) == 2 and 'orbax' in logs[-1].read_text()  # INFO lines, written at exit
  assert [f for f in os.listdir(local / 'tensorboard') if f.startswith('events.out.tfevents.')]
  assert _losses(local) == _losses(unbroken)
  _assert_same_state(_state(local, STEPS), _state(unbroken, STEPS))


def test_a_pattern_that_matches_nothing_in_the_bucket_exits_2_with_one_line(bucket, tmp_path):
  _, env = bucket
  result = run_train(tmp_path, '--config.data.source=files',
                     f'--config.data.files=gs://{BUCKET}/nothing/*.txt', env=env)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"train.py: error: config data: no train files for source='files' "
      f"files='gs://{BUCKET}/nothing/*.txt' validation_percent=2 test_percent=0")


def test_a_prepared_dataset_in_a_bucket_is_read_with_its_tokenizer(bucket, tmp_path):
  client, env = bucket
  tokenizer = tokenizers.train(['the quick brown fox jumps over the lazy dog'] * 20, 'bpe', 280,
                               str(tmp_path / 'tokenizer'))
  documents = [[1, 2, 3], [270, 5]]
  write_prepared(tmp_path / 'prepared', {'train': documents, 'eval': documents[:1]}, tokenizer,
                 vocab_size=280)
  client.put(str(tmp_path / 'prepared'), f'{BUCKET}/prepared', recursive=True)
  read = ('from data import sources; from tasks import language_model as lm; '
          'd = lm.default_data_config(); d.update(source="arrayrecord", path=sys.argv[1]); '
          'print(lm.load_tokenizer(d).spec, [sources.make_source(d, "train")[i].tolist() '
          'for i in range(2)])')
  result = subprocess.run([sys.executable, '-c', f'import sys; {read}', f'gs://{BUCKET}/prepared'],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == f'gs://{BUCKET}/prepared/tokenizer.json {documents}'
