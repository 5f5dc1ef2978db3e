"""Samples from a trained decoder's newest (or chosen) checkpoint, and exports its decode step.

python -m tools.sample --workdir=DIR [--prompt='def ' ...] [--new_tokens=256]
    [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--seed=0] [--step=N] [--export=FILE]

The model is rebuilt from DIR/config.json and its parameters are read from the checkpoint onto
one device. Each prompt is encoded with the run's tokenizer (its data.tokenizer, or its
prepared dataset's, which must still be where the run read it), continued through a key/value
cache (tasks/lm_samples.py) up to the first eos, decoded and printed. `--export=FILE` also
writes the one-token decode step, `(jax.tree.leaves(params), tokens [B, 1], positions [B, 1],
cache) -> (logits [B, 1, V], cache)` for B = the number of prompts, as a serialized
`jax.export` artefact that a server can load with `jax.export.deserialize` and call without
this code.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from etils import epath
from flax import nnx

from hardware import console, cpu_runtime, paths
from models import MODELS, lora
from tasks import language_model, lm_samples
from training import warm_start


class SampleError(ValueError):
  """The workdir holds no decoder this can sample from."""


def load(workdir: str, step: int = 0, decoder: bool = True):
  """(config, make_model, params) of the run in `workdir` at `step` (0: the newest);
  `decoder`: refuse a model that cannot decode."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise SampleError(f'{path} does not exist: not a train.py workdir')
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  model_module = MODELS[config.model.name]
  if decoder and not hasattr(model_module.Model, 'decode'):
    raise SampleError(f'model.name={config.model.name!r} is not a decoder; nothing to sample')
  # Keys added to the model since the run was written take their defaults.
  model, data = model_module.default_config(), language_model.default_data_config()
  model.update(config.model)
  data.update(config.data)
  config.model, config.data = model, data
  source = str(epath.Path(workdir) / 'checkpoints' / str(step)) if step else workdir
  graphdef, template = nnx.split(nnx.eval_shape(
      lambda: model_module.Model(lora.model_config(config.model, config.get('finetune')),
                                 rngs=nnx.Rngs(params=0))), nnx.Param)
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                          nnx.to_pure_dict(template))
  try:
    params = warm_start.load(source, {'params': abstract})[0]['params']
  except warm_start.InitFromError as e:
    raise SampleError(str(e).replace('init_from: ', '')) from e
  missing = [p for p in jax.tree.leaves(params) if isinstance(p, jax.ShapeDtypeStruct)]
  if missing:
    raise SampleError(f'the checkpoint in {source} lacks {len(missing)} parameter arrays of '
                      'this model')

  def make_model(p):
    nnx.replace_by_pure_dict(template, p)
    return nnx.merge(graphdef, template)

  return config, make_model, params


def load_tokenizer(config):
  """The tokenizer the run in `config` trained with."""
  try:
    return language_model.load_tokenizer(config.data)
  except ValueError as e:
    raise SampleError(str(e)) from None


def export_decode_step(make_model, params, batch: int, max_len: int) -> bytes:
  """The serialized one-token decode step for `batch` rows and a cache of `max_len`. It takes
  the parameters as the list `jax.tree.leaves(params)` (serialized trees need string keys;
  unscanned layers are numbered)."""
  treedef = jax.tree.structure(params)

  def decode(leaves, tokens_Bx1, positions_Bx1, cache):
    model = make_model(jax.tree.unflatten(treedef, leaves))
    return model.decode(tokens_Bx1, positions_Bx1, cache)

  cache = jax.eval_shape(lambda: make_model(params).init_cache(batch, max_len))
  token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves(params)]
  return jax.export.export(jax.jit(decode))(leaves, token, token, cache).serialize()


def main(argv):
  console.quiet_libraries(console.verbose())
  _check_flags(argv)
  cpu_runtime.configure()  # on a CPU host with libtpu installed: no TPU backend to fail
  workdir, export = paths.absolute(_WORKDIR.value), paths.absolute(_EXPORT.value)
  try:
    config, make_model, params = load(workdir, _STEP.value)
    tokenizer = load_tokenizer(config)
  except SampleError as e:
    console.usage_error(e)
  if _TOP_K.value > config.model.vocab_size:
    console.usage_error(f'--top_k={_TOP_K.value}: the model has only {config.model.vocab_size} '
                        'tokens')
  texts = lm_samples.generate(make_model, params, _PROMPTS.value, max_len=config.model.max_len,
                              new_tokens=_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                              tokenizer=tokenizer)
  for text in texts:
    print(f'--- sample ---\n{text}')
  if export:
    serialized = export_decode_step(make_model, params, len(_PROMPTS.value), config.model.max_len)
    epath.Path(export).write_bytes(serialized)
    print(f'decode step exported to {export} ({len(serialized):,} bytes)')


def _check_flags(argv):
  """Flag values that cannot work, as one line and exit status 2, before anything loads."""
  if len(argv) > 1:
    console.usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  for ok, flag, rule in ((_NEW_TOKENS.value >= 1, 'new_tokens', 'must be >= 1'),
                         (_TEMPERATURE.value >= 0, 'temperature', 'must be >= 0 (0: greedy)'),
                         (_TOP_K.value >= 0, 'top_k', 'must be >= 0 (0: all tokens)'),
                         (0 < _TOP_P.value <= 1, 'top_p', 'must be in (0, 1]'),
                         (_STEP.value >= 0, 'step', 'must be >= 0 (0: the newest)'),
                         (bool(_PROMPTS.value), 'prompt', 'needs at least one prompt')):
    if not ok:
      console.usage_error(f'--{flag}={flags.FLAGS[flag].value}: {rule}')


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.', required=True)
  _PROMPTS = flags.DEFINE_multi_string('prompt', ['def ', 'import ', 'class '], 'Prompts, '
                                       'sampled together.')
  _NEW_TOKENS = flags.DEFINE_integer('new_tokens', 256, 'Tokens to add (up to model.max_len).')
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0: greedy.')
  _TOP_K = flags.DEFINE_integer('top_k', 0, 'Draw among the k likeliest tokens (0: all).')
  _TOP_P = flags.DEFINE_float('top_p', 1.0, 'Draw from the smallest set this likely (1: all).')
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  _STEP = flags.DEFINE_integer('step', 0, 'The checkpoint step (0: the newest).')
  _EXPORT = flags.DEFINE_string('export', '', 'Also write the serialized decode step here.')
  app.run(main, flags_parser=console.parse_flags)
