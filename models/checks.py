"""Config checks the model files share. Each raises ValueError('<key>: <what is wrong>'), the
form training/config_check.py turns into a one-line error."""

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')  # activations; auto: per platform
PARAM_DTYPES = ('float32', 'bfloat16', 'float16')


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
  require(0 <= m.dropout_rate < 1, 'model.dropout_rate',
          f'must be in [0, 1), got {m.dropout_rate}')


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
