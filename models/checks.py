"""Config checks the model files share. Each raises ValueError('<key>: <what is wrong>'), the
form training/config_check.py turns into a one-line error."""

import functools

import jax

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')  # activations; auto: per platform
PARAM_DTYPES = ('float32', 'bfloat16', 'float16')
# Kernel initializers (models/initializers.py). normal and truncated_normal draw with
# `model.init_std`; the others are scaled by the kernel's fans (Xavier/Glorot: their average,
# He/Kaiming and LeCun: fan-in) or orthogonal.
INITS = ('normal', 'truncated_normal', 'xavier_uniform', 'xavier_normal', 'he_uniform',
         'he_normal', 'lecun_uniform', 'lecun_normal', 'orthogonal')
# A classifier head (`model.head_init`): zeros, the default, starts every model at the loss of
# a uniform guess, ln(num_classes), whatever its features' scale; or any of INITS.
HEAD_INITS = ('zeros', *INITS)
# `model.activation`: name -> function. gelu is tanh-approximated (GPT-2's); gelu_exact is the
# erf form (BERT's `hidden_act: gelu`).
ACTIVATIONS = {'relu': jax.nn.relu, 'leaky_relu': jax.nn.leaky_relu, 'gelu': jax.nn.gelu,
               'gelu_exact': functools.partial(jax.nn.gelu, approximate=False),
               'silu': jax.nn.silu, 'tanh': jax.nn.tanh, 'sigmoid': jax.nn.sigmoid}


def require(ok: bool, key: str, message: str):
  """`key` is the config path, e.g. 'model.width' or 'data.seq_len'."""
  if not ok:
    raise ValueError(f'{key}: {message}')


def one_of(m, key: str, choices):
  require(m[key] in choices, f'model.{key}',
          f'{m[key]!r} is not one of {", ".join(map(str, choices))}')


def positive(m, *keys: str):
  for key in keys:
    require(m[key] > 0, f'model.{key}', f'must be positive, got {m[key]}')


def dtypes_and_dropout(m):
  one_of(m, 'dtype', DTYPES)
  one_of(m, 'param_dtype', PARAM_DTYPES)
  rate(m, 'dropout_rate')


def init(m, *keys: str):
  """`keys`: the initializer-name keys (e.g. 'init', 'head_init'); every model has `init_std`."""
  for key in keys:
    one_of(m, key, INITS)
  require(m.init_std > 0, 'model.init_std', f'must be positive, got {m.init_std}')


def head_init(m):
  one_of(m, 'head_init', HEAD_INITS)


def rate(m, key: str):
  """A drop probability: in [0, 1)."""
  require(0 <= m[key] < 1, f'model.{key}', f'must be in [0, 1), got {m[key]}')


def image_classifier(m):
  """`image_shape` and `num_classes`, which every image model reads."""
  require(len(m.image_shape) == 3 and all(d > 0 for d in m.image_shape), 'model.image_shape',
          f'must be three positive sizes (height, width, channels), got {m.image_shape}')
  positive(m, 'num_classes')


def heads_split(m, ways):
  """`ways(logical_name)`: how many ways the mesh splits that axis. The attention kernels split
  whole heads over the mesh, so the heads must split evenly."""
  for key in ('num_heads', 'num_kv_heads'):
    require(m[key] % ways('heads') == 0, f'model.{key}',
            f'{m[key]} heads cannot be split {ways("heads")} ways over the mesh')
