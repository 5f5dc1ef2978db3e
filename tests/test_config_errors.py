"""Bad configs stop before anything compiles: exit status 2, one line naming the key, no files."""

import itertools
import os

import pytest

from configs import default
from tests.test_train_e2e import run_train
from training import config_check

CASES = {
    'wrong type': (['--config.train.steps=abc'], 'config.train.steps'),
    'unknown key': (['--config.train.stepz=5'], "'stepz'"),
    'unknown preset': (['--config=configs/default.py:bogus'], "unknown preset 'bogus'"),
    'missing config file': (['--config=configs/nope.py'], 'configs/nope.py'),
    'mesh does not divide devices': (['--config.mesh.data=3'], 'do not divide the 8 devices'),
    'batch does not divide data axes': (['--config.data.global_batch_size=12'],
                                        'data.global_batch_size'),
    'learning rate not positive': (['--config.optim.learning_rate=0'], 'optim.learning_rate'),
    'negative steps': (['--config.train.steps=-5'], 'train.steps'),
    'sequence longer than model': (['--config.data.seq_len=64'], 'data.seq_len'),
    'unknown model': (['--config.model.name=gpt5'], 'model.name'),
    'tensor axis does not divide heads': (['--config.mesh.tensor=8', '--config.mesh.data=1'],
                                          'model.num_heads'),
    'unknown flag': (['--bogus_flag=1'], 'bogus_flag'),
    'TPU-only kernel on CPU': (['--config.model.attention=splash'], 'model.attention: splash'),
    'unknown tfds dataset': (['--config.data.source=tfds', '--config.data.tfds_name=no_such_set'],
                             'data.tfds_name'),
    'no files match': (['--config.data.source=files', '--config.data.files=/nonexistent/*.txt'],
                       'no train files'),
    'renamed key': (['--config.data.eval_percent=5'],
                    '--config.data.eval_percent: renamed --config.data.validation_percent'),
    'no prepared dataset': (['--config.data.source=arrayrecord', '--config.data.path=/nonexistent'],
                            'data.path: cannot read /nonexistent/dataset.json'),
    'image augmentation of texts': (['--config=configs/encoder_classify.py:tiny',
                                     '--config.data.augment=flip,mixup'], 'data.augment'),
    'unknown class balance': (['--config=configs/fashion_mnist_cnn.py:tiny',
                               '--config.data.balance=undersample'], 'data.balance'),
    'validation holdout of all': (['--config=configs/fashion_mnist_cnn.py:tiny',
                                   '--config.data.validation_fraction=1.0'],
                                  'data.validation_fraction: 1.0 is not in (0, 1)'),
}


def _snapshot(directory):
  return {p: os.stat(p).st_mtime_ns for p in directory.rglob('*')}


def test_unwritable_workdir_exits_2(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  result = run_train(blocker / 'run')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('train.py: error: --workdir:')


def test_checkpoint_of_another_model_shape_exits_2_and_touches_nothing(tmp_path):
  assert run_train(tmp_path, '--config.train.stop_after=4').returncode == 0
  before = _snapshot(tmp_path)
  result = run_train(tmp_path, '--config.model.embed_dim=64')
  assert result.returncode == 2, result.stderr
  error = result.stderr.strip().splitlines()[-1]
  assert 'does not fit this config: params.' in error and '(32,) there and (64,) here' in error
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_config_exits_2_with_one_line(tmp_path, case):
  args, expected = CASES[case]
  workdir = tmp_path / 'run'
  result = run_train(workdir, *args)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('train.py: error:')]
  assert len(errors) == 1 and expected in errors[0], result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir)


def test_valid_presets_pass_validation():
  for presets in ('', 'llama', 'fsdp', 'fsdp_tp', 'tiny,llama,fsdp_tp'):
    config_check.validate(default.get_config(presets), num_devices=8, num_processes=1)


def test_grad_accumulation_must_divide_the_batch():
  config = default.get_config('tiny')
  config.train.grad_accum_steps = 3
  with pytest.raises(config_check.ConfigError, match='data.global_batch_size'):
    config_check.validate(config, num_devices=1, num_processes=1)


@pytest.mark.parametrize('source, error', [
    ('def get_config(:\n  pass\n', 'line 1: SyntaxError'),
    ('from configs import default\n\n\ndef get_config():\n  return default.get_config().nope\n',
     "line 5: AttributeError: \"'nope'\""),
])
def test_a_config_file_that_fails_exits_2_naming_file_and_line(tmp_path, source, error):
  path = tmp_path / 'mine.py'
  path.write_text(source)
  result = run_train(tmp_path / 'run', f'--config={path}')
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'train.py: error: --config={path}: {error}')


def test_presets_combine_in_any_order():
  configs = [default.get_config(','.join(p))
             for p in itertools.permutations(('tiny', 'llama', 'fsdp_tp'))]
  assert all(c == configs[0] for c in configs)
  assert configs[0].model.mlp_dim == 96 and configs[0].mesh.tensor == 2


def test_a_key_of_another_model_is_an_error(tmp_path):
  cnn = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'fashion_mnist_cnn.py')
  result = run_train(tmp_path / 'run', f'--config={cnn}:tiny', '--config.model.num_heads=4')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == "train.py: error: unknown config key 'num_heads'"
