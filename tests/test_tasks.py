"""The task seam end to end: classifiers and the encoder train through train.py like the LM does,
resume bit for bit, stop early, start from another run, and report whole-split metrics."""

import gzip
import json
import os
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common, fashion_mnist_cnn
from data import classification as data_classification
from data import images as images_lib
from models import MODELS
from models.platforms import resolve_for_platform
from tasks import classification
from tests.test_faults import _assert_same_state, _losses
from tests.test_train_e2e import REPO, run_train, saved_state
from training import metrics


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  """A small Fashion-MNIST-shaped set: each class a bright band at its own row; 40 test images
  (not a multiple of the batch of 16, so the last eval batch is partial)."""
  directory = tmp_path_factory.mktemp('idx')
  rng = np.random.default_rng(0)
  for prefix, n in (('train', 160), ('t10k', 40)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for image, label in zip(images, labels):
      image[2 + 2 * label: 4 + 2 * label] = 250
    _write_idx(directory / f'{prefix}-images-idx3-ubyte.gz', images)
    _write_idx(directory / f'{prefix}-labels-idx1-ubyte.gz', labels)
  return directory


CNN = '--config=' + os.path.join(REPO, 'configs', 'fashion_mnist_cnn.py') + ':tiny'
RESNET = '--config=' + os.path.join(REPO, 'configs', 'fashion_mnist_resnet.py') + ':tiny'


def _data(idx_dir):
  return [f'--config.data.path={idx_dir}', '--config.data.normalize_sample=100']


@pytest.fixture(scope='module')
def resnet_unbroken(tmp_path_factory, idx_dir):
  workdir = tmp_path_factory.mktemp('resnet_unbroken')
  result = run_train(workdir, RESNET, *_data(idx_dir))
  assert result.returncode == 0, result.stderr
  return workdir


def test_resnet_stopped_and_resumed_matches_the_unbroken_run(resnet_unbroken, idx_dir, tmp_path):
  """BatchNorm statistics live in the train state: checkpointed and restored bit for bit."""
  assert run_train(tmp_path, RESNET, *_data(idx_dir),
                   '--config.train.stop_after=5').returncode == 0
  resumed = run_train(tmp_path, RESNET, *_data(idx_dir))
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resumed from the checkpoint at step 5' in resumed.stdout
  assert _losses(tmp_path) == _losses(resnet_unbroken)
  state = saved_state(tmp_path, 8)
  assert 'model_state' in state and state['model_state']  # BatchNorm's running statistics
  _assert_same_state(state, saved_state(resnet_unbroken, 8))


def test_classification_reports_validation_and_test_metrics_and_confusion_matrices(
    resnet_unbroken, idx_dir):
  """eval/* on the validation holdout at every eval; test/* once, on the whole test split."""
  records = metrics.read_metrics(resnet_unbroken)
  evals = [r for r in records if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [4, 8]
  assert all(0 <= r['eval/accuracy'] <= 1 and 'eval/top5_accuracy' in r for r in evals)
  d = fashion_mnist_cnn.get_config('tiny').data
  d.path = str(idx_dir)
  held_out = len(data_classification.make_source(d, 'validation'))
  validation = json.loads((resnet_unbroken / 'confusion_matrix_validation.json').read_text())
  # About a tenth of the 160 training images, class by class.
  assert validation['step'] == 8 and np.sum(validation['confusion']) == held_out == 18
  assert np.trace(validation['confusion']) / 18 == pytest.approx(evals[-1]['eval/accuracy'])
  [tested] = [r for r in records if 'test/accuracy' in r]
  test = json.loads((resnet_unbroken / 'confusion_matrix_test.json').read_text())
  assert test['step'] == tested['step'] == 8 and np.sum(test['confusion']) == 40  # each once
  assert len(test['classes']) == 10 and test['classes'][0] == 'T-shirt/top'
  assert (resnet_unbroken / 'confusion_matrix_test.png').stat().st_size > 1000
  assert np.trace(test['confusion']) / 40 == pytest.approx(tested['test/accuracy'])
  summary = json.loads((resnet_unbroken / 'summary.json').read_text())
  assert summary['test'] == {'step': 8, 'parameters': 'last',
                             **{k: v for k, v in tested.items() if k.startswith('test/')}}


def test_eval_metrics_match_a_hand_computation_with_a_padded_last_batch():
  config = fashion_mnist_cnn.get_config()
  config.model.num_classes, config.task.top_k = 3, 2
  task = classification.Task(config, None)
  logits = jnp.array([[3., 2., 1.], [1., 3., 2.], [1., 2., 3.], [3., 1., 2.], [0., 0., 9.]])
  labels = jnp.array([0, 2, 2, 1, 0])
  mask = jnp.array([1., 1., 1., 1., 0.])  # the last row is padding: it must not count
  sums = task.eval_sums(lambda inputs, train: logits, {'inputs': None, 'label': labels,
                                                      'mask': mask})
  figures = task.eval_metrics(jax_to_numpy(sums))
  # Predictions 0, 1, 2, 0 for labels 0, 2, 2, 1: two right of four.
  assert figures['accuracy'] == 0.5
  np.testing.assert_array_equal(sums['confusion'], [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected_loss = -np.mean([log_softmax[i, labels[i]] for i in range(4)])
  assert figures['loss'] == pytest.approx(expected_loss, rel=1e-6)
  # Per class: precision 1/2, 0, 1/1; recall 1/1, 0/1, 1/2 -> F1 2/3, 0, 2/3.
  assert figures['macro_f1'] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
  # Top 2: row 0 {0, 1} has 0; row 1 {1, 2} has 2; row 2 {2, 1} has 2; row 3 {0, 2} lacks 1.
  assert figures['top2_accuracy'] == 0.75


def jax_to_numpy(tree):
  return {k: np.asarray(v) for k, v in tree.items()}


# Predictions that training leaves as they are: a learning rate of (nearly) zero, and a random
# head (the default zero head's logits are all near zero, so even 1e-12 steps reorder them).
FROZEN = ['--config.optim.learning_rate=1e-12', '--config.model.head_init=lecun_uniform']


def test_early_stopping_stops_keeps_the_best_and_stays_stopped(idx_dir, tmp_path):
  # A learning rate of zero never improves on the first eval: patience 2 ends it at step 6.
  args = [CNN, *_data(idx_dir), '--config.train.steps=40', '--config.train.eval_every=2',
          '--config.early_stop.metric=accuracy', '--config.early_stop.mode=max',
          '--config.early_stop.patience=2', *FROZEN]
  result = run_train(tmp_path, *args)
  assert result.returncode == 0, result.stderr
  assert 'early stopping at step 6' in result.stdout
  assert max(r['step'] for r in metrics.read_metrics(tmp_path)) == 6
  assert sorted(os.listdir(tmp_path / 'best')) == ['2']  # the best eval, apart from the latest
  assert '6' in os.listdir(tmp_path / 'checkpoints')
  again = run_train(tmp_path, *args)
  assert again.returncode == 0 and 'Training is already complete' in again.stdout


def test_early_stopping_patience_survives_a_resume(idx_dir, tmp_path):
  args = [CNN, *_data(idx_dir), '--config.train.steps=40', '--config.train.eval_every=2',
          '--config.train.checkpoint_every=2', '--config.early_stop.metric=accuracy',
          '--config.early_stop.mode=max', '--config.early_stop.patience=2', *FROZEN]
  assert run_train(tmp_path, *args, '--config.train.stop_after=4').returncode == 0
  result = run_train(tmp_path, *args)  # one bad eval already counted at step 4
  assert result.returncode == 0, result.stderr
  assert 'early stopping at step 6' in result.stdout


# Early stopping on validation accuracy, with real learning, so that the choices have some
# room to differ; pixels / 255 as inputs, so that a test can compute the model's predictions.
SELECTING = [CNN, '--config.train.steps=12', '--config.train.eval_every=2',
             '--config.early_stop.metric=accuracy', '--config.early_stop.mode=max',
             '--config.early_stop.patience=2', '--config.data.normalize=none',
             '--config.data.normalize_sample=100']


@pytest.fixture(scope='module')
def honest_and_scrambled(tmp_path_factory, idx_dir):
  """Two runs: on idx_dir, and on a copy whose test labels are all shifted by one class."""
  scrambled = tmp_path_factory.mktemp('scrambled_idx')
  for name in os.listdir(idx_dir):
    data = gzip.decompress((idx_dir / name).read_bytes())
    if name.startswith('t10k-labels'):
      data = data[:8] + bytes((b + 1) % 10 for b in data[8:])
    (scrambled / name).write_bytes(gzip.compress(data))
  workdirs = []
  for data_dir in (idx_dir, scrambled):
    workdir = tmp_path_factory.mktemp('selecting')
    result = run_train(workdir, *SELECTING, f'--config.data.path={data_dir}')
    assert result.returncode == 0, result.stderr
    workdirs.append(workdir)
  return workdirs


def _choices(workdir):
  """What training chose by: the eval figures, where it stopped and the step kept as best."""
  records = metrics.read_metrics(workdir)
  evals = [{k: v for k, v in r.items() if k.startswith(('eval/', 'early_stop/')) or k == 'step'}
           for r in records if 'eval/loss' in r]
  return evals, records[-1]['step'], sorted(os.listdir(workdir / 'best'))


def test_the_test_labels_change_no_choice_made_in_training(honest_and_scrambled):
  honest, scrambled = honest_and_scrambled
  assert _choices(honest) == _choices(scrambled)
  confusion = [json.loads((w / 'confusion_matrix_test.json').read_text())['confusion']
               for w in honest_and_scrambled]
  # The same predictions, each against its label + 1: the rows move down by one class.
  np.testing.assert_array_equal(np.roll(confusion[0], 1, axis=0), confusion[1])


def test_test_figures_are_the_best_steps_predictions_scored_by_hand(honest_and_scrambled,
                                                                    idx_dir):
  honest = honest_and_scrambled[0]
  summary = json.loads((honest / 'summary.json').read_text())
  [best] = os.listdir(honest / 'best')
  assert summary['test']['parameters'] == 'best/' and summary['test']['step'] == int(best)
  config = fashion_mnist_cnn.get_config('tiny')
  model = MODELS['cnn'].Model(resolve_for_platform(config.model, 'cpu'), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, ocp.StandardCheckpointer().restore(
      honest / 'best' / best / 'default')['params'])
  nnx.update(model, params)
  images = images_lib.read_idx(str(idx_dir / 't10k-images-idx3-ubyte.gz'), 3)
  labels = images_lib.read_idx(str(idx_dir / 't10k-labels-idx1-ubyte.gz'), 1)
  logits = np.asarray(model(jnp.float32(images[..., None] / 255), train=False), np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  test = summary['test']
  assert test['test/accuracy'] == np.mean(logits.argmax(-1) == labels)
  assert test['test/loss'] == pytest.approx(-np.mean(log_softmax[np.arange(40), labels]),
                                            rel=1e-5)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mlm')
  result = run_train(workdir, '--config=' + os.path.join(REPO, 'configs', 'encoder_mlm.py')
                     + ':tiny', '--config.data.test_percent=5')
  assert result.returncode == 0, result.stderr
  assert {'eval/accuracy', 'test/accuracy'} <= set(metrics.read_metrics(workdir)[-1])
  return workdir


def test_mlm_evaluate_repeats_the_test_figures_of_the_run(pretrained, tmp_path):
  test = json.loads((pretrained / 'summary.json').read_text())['test']
  result = _evaluate(pretrained, '--split=test', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  written = json.loads((pretrained / 'evaluations' / 'test-8.json').read_text())
  assert {f'test/{k}': written[k] for k in ('loss', 'accuracy')} == {
      k: test[k] for k in ('test/loss', 'test/accuracy')}


CLASSIFY = '--config=' + os.path.join(REPO, 'configs', 'encoder_classify.py') + ':tiny'


def test_init_from_loads_the_backbone_and_initialises_the_new_head(pretrained, tmp_path):
  result = run_train(tmp_path, CLASSIFY, f'--config.init_from={pretrained}',
                     '--config.finetune.freeze_backbone=true', '--config.train.steps=4')
  assert result.returncode == 0, result.stderr
  assert f'Starting from {pretrained}' in result.stdout
  before, after = saved_state(pretrained, 8)['params'], saved_state(tmp_path, 4)['params']
  # The backbone was loaded and, frozen, did not move; the classifier is new and trained.
  np.testing.assert_array_equal(after['embed']['embedding'], before['embed']['embedding'])
  assert 'classifier' in after and 'classifier' not in before


def test_init_from_with_another_shape_is_a_one_line_error(pretrained, tmp_path):
  result = run_train(tmp_path, CLASSIFY, f'--config.init_from={pretrained}',
                     '--config.model.embed_dim=64')
  assert result.returncode == 2, result.stderr
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('train.py: error: init_from: params.') and '(32,)' in error


def test_a_classifier_compiles_for_a_tpu_topology(tmp_path):
  result = run_train(tmp_path, CNN, '--compile_only', '--topology=v5e-8')
  assert result.returncode == 0, result.stderr
  assert 'inputs 16x28x28x1, label 16' in result.stdout


def test_gradient_accumulation_splits_every_batch_key(idx_dir, tmp_path):
  args = [CNN, *_data(idx_dir), '--config.model.dropout_rate=0', '--config.train.steps=4',
          '--config.train.eval_every=0']
  assert run_train(tmp_path / 'one', *args).returncode == 0
  result = run_train(tmp_path / 'two', *args, '--config.train.grad_accum_steps=2')
  assert result.returncode == 0, result.stderr
  one, two = (metrics.read_metrics(tmp_path / d) for d in ('one', 'two'))
  np.testing.assert_allclose([r['train/loss'] for r in two], [r['train/loss'] for r in one],
                             rtol=1e-5)
  np.testing.assert_allclose([r['train/accuracy'] for r in two],
                             [r['train/accuracy'] for r in one])


def test_mixup_cutmix_and_reweighting_train_and_the_class_histogram_is_reported(idx_dir,
                                                                                tmp_path):
  result = run_train(tmp_path, CNN, *_data(idx_dir), '--config.train.steps=4',
                     '--config.train.eval_every=4', '--config.train.grad_accum_steps=2',
                     '--config.data.augment=flip,crop,jitter,mixup,cutmix',
                     '--config.data.balance=reweight')
  assert result.returncode == 0, result.stderr
  labels = np.random.default_rng(0).integers(0, 10, 160)  # idx_dir's training labels
  # Less the validation holdout, a tenth of each class.
  counts = np.array([c - round(0.1 * c) for c in np.bincount(labels, minlength=10)])
  assert (f'train classes: T-shirt/top {counts[0]} ({counts[0] / counts.sum():.1%})'
          in result.stdout)
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert list(summary['train_classes'].values()) == counts.tolist()
  assert summary['train_classes'].keys() == set(common.FASHION_MNIST_CLASSES)
  assert np.isfinite(summary['last']['train/loss']) and 'eval/accuracy' in summary['last']


def test_lm_eval_sample_is_fixed_and_drawn_from_all_documents(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from tasks import language_model  # pylint: disable=g-import-not-at-top
  letters = [bytes([65 + i]) for i in range(26)]  # document i is one letter, repeated
  for i, letter in enumerate(letters):
    (tmp_path / f'doc{i:02d}.txt').write_bytes(letter * 40)
  config = default.get_config('tiny')
  config.data.update(source='files', files=str(tmp_path / '*.txt'), validation_percent=99,
                     prefetch_batches=0)
  config.task.eval_batches = 2

  def sample(training_seed):
    config.data.shuffle_seed = training_seed
    batches = language_model.Task(config, None).eval_batches()
    return np.concatenate([b['tokens'] for b in batches])

  first, again, other_seed = sample(0), sample(0), sample(7)
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first, other_seed)  # the training seed does not move it
  seen = {bytes([t]) for t in np.unique(first)} & set(letters)
  in_file_order = set(letters[:len(seen)])
  assert len(seen) >= 5 and seen != in_file_order  # a shuffled sample, not the first files


def _evaluate(workdir, *args, cwd):
  return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '--mode=evaluate',
                         f'--workdir={workdir}', *args], capture_output=True, text=True,
                        cwd=cwd, timeout=600, check=False)


def test_evaluate_reproduces_the_figures_training_wrote(honest_and_scrambled, tmp_path):
  """`train.py --mode=evaluate` as a user runs it, from another folder with a relative workdir
  and no --config (the run's config.json): the best step's test figures are summary.json's,
  and the last step's validation figures are its last evaluation's."""
  honest = honest_and_scrambled[0]
  relative = os.path.relpath(honest, tmp_path)
  summary = json.loads((honest / 'summary.json').read_text())
  result = _evaluate(relative, '--split=test', '--step=best', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  [best] = os.listdir(honest / 'best')
  written = json.loads((honest / 'evaluations' / f'test-{best}.json').read_text())
  assert written['step'] == summary['test']['step']
  assert {f'test/{k}': v for k, v in written.items() if k in ('loss', 'accuracy', 'macro_f1')
          } == {k: summary['test'][k] for k in ('test/loss', 'test/accuracy', 'test/macro_f1')}
  last = [r for r in metrics.read_metrics(honest) if 'eval/loss' in r][-1]
  result = _evaluate(relative, cwd=tmp_path)  # the newest checkpoint, the validation split
  assert result.returncode == 0, result.stderr
  written = json.loads((honest / 'evaluations' / f'validation-{last["step"]}.json').read_text())
  assert written['accuracy'] == last['eval/accuracy'] and written['loss'] == last['eval/loss']
  assert f'validation split, step {last["step"]}' in result.stdout


@pytest.mark.parametrize('args, message', [
    (('--step=999',), '--step=999: '),
    (('--step=last',), "--step=last: a step number, 'best', or empty"),
    (('--config.train.steps=3',), '--config.* overrides need --config=FILE'),
])
def test_evaluate_refuses_bad_input_in_one_line(honest_and_scrambled, tmp_path, args, message):
  result = _evaluate(honest_and_scrambled[0], *args, cwd=tmp_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluate_names_what_a_workdir_lacks(tmp_path):
  result = _evaluate(tmp_path, cwd=tmp_path)  # no run at all
  assert result.returncode == 2 and 'not a train.py workdir' in result.stderr, result.stderr
  result = _evaluate(tmp_path, '--config=' + os.path.join(REPO, 'configs', 'default.py') +
                     ':tiny', '--split=test', cwd=tmp_path)
  assert result.returncode == 2 and 'has no test split' in result.stderr, result.stderr
  result = _evaluate(tmp_path, '--config=' + os.path.join(REPO, 'configs', 'default.py') +
                     ':tiny', cwd=tmp_path)
  assert result.returncode == 2 and 'holds no checkpoint' in result.stderr, result.stderr


def test_lm_run_tests_once_at_the_end_and_evaluate_repeats_it(tmp_path):
  """A tiny LM run with test files held out: test/* in its last metrics record and summary.json,
  and the same figures from `--mode=evaluate --split=test`."""
  workdir = tmp_path / 'run'
  result = run_train(workdir, '--config.data.test_percent=5', '--config.task.num_samples=0')
  assert result.returncode == 0, result.stderr
  records = metrics.read_metrics(workdir)
  test = {k: v for k, v in records[-1].items() if k.startswith('test/')}
  assert set(test) == {'test/loss', 'test/bits_per_byte'}
  assert all('test/loss' not in r for r in records[:-1])  # once, at the end
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['test'] == {'step': 8, 'parameters': 'last', **test}
  result = _evaluate(workdir, '--split=test', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  written = json.loads((workdir / 'evaluations' / 'test-8.json').read_text())
  assert {f'test/{k}': written[k] for k in ('loss', 'bits_per_byte')} == test
