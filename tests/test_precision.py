"""Dynamic loss scaling: overflow halves the scale and skips the update, no NaN reaches the
parameters, the scale grows back, and scaling by a power of two changes nothing in float32."""

import jax
import numpy as np

from configs import default
from parallel import sharding
from tasks import language_model
from tests import test_train_e2e as e2e
from training import metrics as metrics_lib
from training import precision
from training import state as state_lib
from training import step as step_lib


def _train(config, steps, seed=0):
  """(per-step metrics, per-step params) of `steps` steps of `config` on one device."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.make_setup(config, mesh)
  rng = np.random.default_rng(seed)
  shape = (config.data.global_batch_size, config.data.seq_len + 1)
  with sharding.activate(mesh, config.mesh.rules):
    state = state_lib.init_state(config, setup)
    train_step, _ = step_lib.compile_steps(setup, config, mesh)
    history = [jax.device_get(state)]
    metrics = []
    for _ in range(steps):
      tokens = rng.integers(0, 256, shape, dtype=np.int32)
      state, m = train_step(state, language_model.one_document_per_row(tokens))
      metrics.append(jax.device_get(m))
      history.append(jax.device_get(state))
  return metrics, history


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def _config(**train):
  config = default.get_config('tiny')
  config.train.update(train)
  return config


def test_the_scale_halves_on_overflow_and_doubles_after_a_period():
  train = _config(loss_scale_init=8.0, loss_scale_period=3).train
  s = precision.initial_state(train)
  trace = []
  for finite in (True, True, False, False, True, True, True, False, False, False, False, False):
    s = precision.next_state(train, s, np.bool_(finite))
    trace.append(float(s['scale']))
  assert trace == [8, 8, 4, 2, 2, 2, 4, 2, 1, 1, 1, 1]  # never below 1
  assert int(s['overflows']) == 7 and int(s['good_steps']) == 0


def test_loss_scale_is_on_for_float16_only_unless_asked():
  config = _config()
  assert not precision.enabled(config)
  config.model.dtype = 'float16'
  assert precision.enabled(config)
  config.train.loss_scale = 'none'
  assert not precision.enabled(config)
  config.model.dtype, config.train.loss_scale = 'float32', 'dynamic'
  assert precision.enabled(config)


def test_a_power_of_two_scale_changes_nothing_in_float32():
  """Scaling the loss by 2^k and the gradients by 2^-k is exact in float32, so the run with
  scaling is the run without up to the order XLA picks for each program's sums (catches a
  scale applied once but not undone, which would be off by 2^10)."""
  plain, plain_states = _train(_config(), 3)
  scaled, scaled_states = _train(_config(loss_scale='dynamic', loss_scale_init=2.0**10), 3)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(plain_states[1:], scaled_states[1:]):
    jax.tree.map(close, a['params'], b['params'])
  close([m['train/loss'] for m in plain], [m['train/loss'] for m in scaled])
  assert [float(m['train/loss_scale']) for m in scaled] == [2.0**10] * 3


def test_float16_overflow_halves_the_scale_and_skips_the_update():
  """float16 activations with a far too large scale: the first steps overflow. Each is skipped
  (parameters and optimizer state untouched, no NaN), the scale halves, and training goes on
  once it fits; the guard and the non-finite policy stay out of it."""
  config = _config(loss_scale_init=2.0**40)
  config.model.dtype = 'float16'
  metrics, states = _train(config, 40)
  overflowed = [not np.isfinite(m['train/grad_norm']) for m in metrics]
  assert overflowed[0], 'the test needs the first step to overflow'
  assert not all(overflowed), 'the scale never came down to what float16 holds'
  for i, (m, before, after) in enumerate(zip(metrics, states, states[1:])):
    assert m['guard/accept'] == 1 and int(after['skipped_steps']) == 0
    jax.tree.map(lambda x: np.testing.assert_array_equal(np.isfinite(x), True), after['params'])
    scale_before, scale_after = before['loss_scale']['scale'], after['loss_scale']['scale']
    assert m['train/loss_scale'] == scale_before
    if overflowed[i]:
      assert scale_after == scale_before / 2
      jax.tree.map(np.testing.assert_array_equal, after['params'], before['params'])
      jax.tree.map(np.testing.assert_array_equal, after['opt_state'], before['opt_state'])
    else:  # an update (the first after warmup's zero rate leaves the parameters as they were)
      assert scale_after == scale_before
      assert not _same(after['opt_state'], before['opt_state'])
  assert not _same(states[-1]['params'], states[0]['params'])
  assert int(states[-1]['loss_scale']['overflows']) == sum(overflowed)
  assert metrics[-1]['train/loss_scale_overflows'] == sum(overflowed)


def test_the_loss_scale_survives_a_resume_bit_for_bit(tmp_path):
  """The scale doubles at steps 3 and 6; a run stopped at step 4 and resumed must carry the
  scale and its count of good steps over, and end where the unbroken run ends."""
  flags = ('--config.train.loss_scale=dynamic', '--config.train.loss_scale_init=1024',
           '--config.train.loss_scale_period=3')
  unbroken, broken = tmp_path / 'unbroken', tmp_path / 'broken'
  for workdir, extra in ((unbroken, ()), (broken, ('--config.train.stop_after=4',)),
                         (broken, ())):
    result = e2e.run_train(workdir, *flags, *extra)
    assert result.returncode == 0, result.stderr
  reference, resumed = e2e.saved_state(unbroken, 8), e2e.saved_state(broken, 8)
  assert float(reference['loss_scale']['scale']) == 1024 * 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  logged = [r['train/loss_scale'] for r in metrics_lib.read_metrics(broken)]
  assert logged == [1024] * 3 + [2048] * 3 + [4096] * 2
