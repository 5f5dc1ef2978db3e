"""Hugging Face weights in and out: GPT-2 and Llama checkpoints <-> the decoder (transformer.py).

python -m tools.hf import --hf_dir=DIR --workdir=W [--config=configs/default.py:llama ...]
    reads DIR/config.json and DIR's safetensors (one file or an index of shards), and writes W/
    as a params-only run: W/config.json (the given config with the checkpoint's shape) and an
    Orbax checkpoint W/state. It prints the `--config.model.*` overrides that, with the same
    --config, build this shape; train from the weights with `--config.init_from=W`, or sample
    them with `python -m tools.sample --workdir=W`.
python -m tools.hf export --workdir=W --out=DIR [--step=N]
    writes a run's newest (or step N's) parameters as DIR/config.json + DIR/model.safetensors,
    which `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads.

Both directions are one table per family: HF tensor name <- podium parameter path(s). HF keeps
torch Linear weights as [out, in] (transposed here; GPT-2's Conv1D is already [in, out]), and
GPT-2 fuses query, key and value into one `c_attn` (split along its output axis). Rotary
embeddings need no permutation: HF Llama rotates halves, as models/rotary.py does; Llama 3.1
and 3.2's rope scaling (rope_type 'llama3') is `model.rope_scaling=llama3`. Features podium does
not have (other rope scalings, Llama biases, another activation, ...) are one-line errors naming
the HF key. Only numpy and safetensors run here; torch is for the tests.
"""

import json
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from hardware import console, cpu_runtime, paths
from models import transformer
from tools import sample

GPT2, LLAMA = 'gpt2', 'llama'
_ARCHITECTURES = {GPT2: 'GPT2LMHeadModel', LLAMA: 'LlamaForCausalLM'}
# Buffers some checkpoints carry that hold no weights (causal masks, rotary frequencies).
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


class HFError(ValueError):
  """A checkpoint or model that has no equivalent on the other side."""


def _require(ok: bool, message: str):
  if not ok:
    raise HFError(message)


# --- configs -------------------------------------------------------------------------------

class _HFConfig(dict):
  """A config.json's keys; one it lacks that is needed is an HFError naming the file."""

  def __init__(self, path: epath.Path):
    super().__init__(json.loads(path.read_text()))
    self.path = path

  def __missing__(self, key):
    raise HFError(f'{self.path} lacks the key {key!r}')


def _supported(c: dict, key: str, *values):
  """Raises naming `key` unless the HF config leaves it unset or sets one of `values`."""
  if c.get(key) is not None and c[key] not in values:
    raise HFError(f'{key}={c[key]!r} is not supported (only {", ".join(map(repr, values))})')


def _gpt2_model(c: dict) -> dict:
  """GPT-2 config.json -> the model keys that build its shape."""
  _supported(c, 'activation_function', 'gelu_new', 'gelu_pytorch_tanh')  # gelu, tanh-approximated
  _supported(c, 'scale_attn_weights', True)
  _supported(c, 'scale_attn_by_inverse_layer_idx', False)
  _supported(c, 'add_cross_attention', False)
  return dict(num_layers=c['n_layer'], num_heads=c['n_head'], num_kv_heads=c['n_head'],
              embed_dim=c['n_embd'], mlp_dim=c.get('n_inner') or 4 * c['n_embd'],
              max_len=c['n_positions'], vocab_size=c['vocab_size'], position='learned',
              norm='layernorm', norm_eps=c.get('layer_norm_epsilon', 1e-5), mlp='gelu',
              activation='gelu', use_bias=True, tie_embeddings=c.get('tie_word_embeddings', True))


def _llama_model(c: dict) -> dict:
  """Llama config.json -> the model keys that build its shape."""
  heads = c['num_attention_heads']
  _supported(c, 'hidden_act', 'silu')
  _supported(c, 'attention_bias', False)
  _supported(c, 'mlp_bias', False)
  _supported(c, 'head_dim', c['hidden_size'] // heads)
  # rope_theta at the top level (older files) or in rope_parameters / rope_scaling (newer).
  rope_key = 'rope_parameters' if c.get('rope_parameters') else 'rope_scaling'
  rope = c.get(rope_key) or {}
  return dict(num_layers=c['num_hidden_layers'], num_heads=heads,
              num_kv_heads=c.get('num_key_value_heads') or heads, embed_dim=c['hidden_size'],
              mlp_dim=c['intermediate_size'], max_len=c['max_position_embeddings'],
              vocab_size=c['vocab_size'], position='rope',
              rope_theta=float(rope.get('rope_theta', c.get('rope_theta', 10000.0))),
              **_rope_scaling(rope, rope_key),
              norm='rmsnorm', norm_eps=c.get('rms_norm_eps', 1e-6), mlp='swiglu',
              activation='gelu', use_bias=False,
              tie_embeddings=c.get('tie_word_embeddings', False))


# HF's llama3 rope parameters -> podium's model keys (models/layers.py).
_LLAMA3_KEYS = {'factor': 'rope_factor', 'low_freq_factor': 'rope_low_freq_factor',
                'high_freq_factor': 'rope_high_freq_factor',
                'original_max_position_embeddings': 'rope_original_max_len'}


def _rope_scaling(rope: dict, rope_key: str) -> dict:
  """The rope_scaling model keys of a Llama config's `rope_key` section (Llama 3.1 and 3.2
  files carry rope_type 'llama3'; plain rotary has none or 'default')."""
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type == 'default':
    return dict(rope_scaling='none')
  _require(rope_type == 'llama3', f'{rope_key}: rope_type={rope_type!r} is not supported (only '
           "'default' and 'llama3')")
  missing = [k for k in _LLAMA3_KEYS if rope.get(k) is None]
  _require(not missing, f'{rope_key}: rope_type llama3 lacks {", ".join(missing)}')
  keys = {ours: float(rope[hf_key]) for hf_key, ours in _LLAMA3_KEYS.items()}
  keys['rope_original_max_len'] = int(keys['rope_original_max_len'])
  return dict(rope_scaling='llama3', **keys)


_MODEL_KEYS = {GPT2: _gpt2_model, LLAMA: _llama_model}


def _hf_config(m, family: str, dtype: str) -> dict:
  """Model keys -> the family's config.json (the inverse of `_MODEL_KEYS[family]`)."""
  common = dict(model_type=family, architectures=[_ARCHITECTURES[family]],
                vocab_size=m.vocab_size, tie_word_embeddings=m.tie_embeddings, dtype=dtype,
                bos_token_id=None, eos_token_id=None)  # podium's tokens are bytes
  if family == GPT2:
    return dict(common, n_layer=m.num_layers, n_head=m.num_heads, n_embd=m.embed_dim,
                n_inner=m.mlp_dim, n_positions=m.max_len, layer_norm_epsilon=m.norm_eps,
                activation_function='gelu_new')
  rope = {}
  if m.rope_scaling == 'llama3':  # as Llama 3.1 and 3.2 files write it
    rope = dict(rope_scaling=dict(rope_type='llama3',
                                  **{hf_key: m[ours] for hf_key, ours in _LLAMA3_KEYS.items()}))
  return dict(common, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
              num_key_value_heads=m.num_kv_heads, hidden_size=m.embed_dim,
              intermediate_size=m.mlp_dim, max_position_embeddings=m.max_len,
              rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, hidden_act='silu',
              attention_bias=False, mlp_bias=False, **rope)


def _family_of(m) -> str:
  """The family whose checkpoints hold this model; raises naming the first key that has no
  equivalent there."""
  family = GPT2 if m.position == 'learned' else LLAMA
  back = _MODEL_KEYS[family](_hf_config(m, family, 'float32'))
  for key, value in back.items():
    _require(m[key] == value, f'model.{key}={m[key]!r} has no equivalent in a {family} '
             f'checkpoint (it needs {value!r})')
  return family


# --- tensor names --------------------------------------------------------------------------

# Per family: the top-level tensors (HF name without the prefix -> podium path), the per-block
# prefix, and each block's modules (HF module -> podium modules; several: concatenated along the
# output axis). A module named *norm has a scale (and bias); the others a kernel (and bias).
_LAYOUT = {
    GPT2: ('transformer.', 'transformer.h.{}.',
           {'wte.weight': 'embed.embedding', 'wpe.weight': 'positions',
            'ln_f.weight': 'final_norm.scale', 'ln_f.bias': 'final_norm.bias'},
           {'ln_1': ('attn_norm',),
            'attn.c_attn': ('attention.query', 'attention.key', 'attention.value'),
            'attn.c_proj': ('attention.out',), 'ln_2': ('mlp_norm',), 'mlp.c_fc': ('mlp.up',),
            'mlp.c_proj': ('mlp.down',)}),
    LLAMA: ('model.', 'model.layers.{}.',
            {'embed_tokens.weight': 'embed.embedding', 'norm.weight': 'final_norm.scale'},
            {'input_layernorm': ('attn_norm',), 'self_attn.q_proj': ('attention.query',),
             'self_attn.k_proj': ('attention.key',), 'self_attn.v_proj': ('attention.value',),
             'self_attn.o_proj': ('attention.out',), 'post_attention_layernorm': ('mlp_norm',),
             'mlp.gate_proj': ('mlp.gate',), 'mlp.up_proj': ('mlp.up',),
             'mlp.down_proj': ('mlp.down',)}),
}


def _table(family: str, m) -> list[tuple[str, tuple, bool]]:
  """(HF tensor name, podium paths, transposed) for every tensor of the model. Several paths:
  the HF tensor is their concatenation along its last axis. Block paths start with the layer
  index. Llama's Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out] already."""
  top, block, top_names, modules = _LAYOUT[family]
  path = lambda dotted, *lead: (*lead, *dotted.split('.'))
  table = [(top + name, (path(ours),), False) for name, ours in top_names.items()]
  if not m.tie_embeddings:
    table.append(('lm_head.weight', (('unembed', 'kernel'),), True))
  for i in range(m.num_layers):
    for module, ours in modules.items():
      weight = 'scale' if ours[0].endswith('norm') else 'kernel'
      transposed = family == LLAMA and weight == 'kernel'
      table.append((f'{block.format(i)}{module}.weight',
                    tuple(path(o, i) + (weight,) for o in ours), transposed))
      if m.use_bias:
        table.append((f'{block.format(i)}{module}.bias',
                      tuple(path(o, i) + ('bias',) for o in ours), False))
  return table


def _flat_params(params: dict, m) -> dict[tuple, np.ndarray]:
  """A params tree -> {path: array}, block paths led by their layer index (stacked layers
  taken apart)."""
  flat = {}

  def walk(tree, path):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, (*path, key))
      else:
        flat[(*path, key)] = np.asarray(value)

  blocks = params['blocks']['layers']
  walk({k: v for k, v in params.items() if k != 'blocks'}, ())
  for i in range(m.num_layers):
    walk(_layer(blocks, i) if m.scan_layers else blocks[i], (i,))
  return flat


def _layer(stacked: dict, i: int) -> dict:
  """Layer `i` of stacked blocks."""
  return {k: _layer(v, i) if isinstance(v, dict) else v[i] for k, v in stacked.items()}


def _stack(layers: list[dict]) -> dict:
  """Per-layer trees -> one tree with a leading layer axis (scanned blocks)."""
  return {k: _stack([l[k] for l in layers]) if isinstance(layers[0][k], dict)
          else np.stack([l[k] for l in layers]) for k in layers[0]}


def _params_tree(flat: dict[tuple, np.ndarray], m) -> dict:
  """The inverse of `_flat_params`: the model's params tree, layers stacked if scanned."""
  tree, layers = {}, [{} for _ in range(m.num_layers)]
  for path, value in flat.items():
    node, path = (layers[path[0]], path[1:]) if isinstance(path[0], int) else (tree, path)
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  tree['blocks'] = {'layers': _stack(layers) if m.scan_layers else dict(enumerate(layers))}
  return tree


# --- in and out ----------------------------------------------------------------------------

def _read_tensors(hf_dir: epath.Path) -> dict[str, np.ndarray]:
  index = hf_dir / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  else:
    files = ['model.safetensors']
  _require((hf_dir / files[0]).exists(), f'{hf_dir / files[0]} does not exist')
  tensors = {}
  for name in files:
    tensors.update(safetensors.numpy.load_file(os.fspath(hf_dir / name)))
  return tensors


def from_hf(hf_dir: str, scan_layers: bool = False) -> tuple[dict, dict]:
  """(model key overrides, params tree) of the GPT-2 or Llama checkpoint in `hf_dir`, in the
  checkpoint's dtype; `scan_layers`: with the blocks stacked."""
  hf_dir = epath.Path(hf_dir)
  hf_config = _HFConfig(hf_dir / 'config.json')
  family = hf_config.get('model_type')
  _require(family in _MODEL_KEYS,
           f'model_type={family!r} in {hf_dir}/config.json: only gpt2 and llama are supported')
  overrides = _MODEL_KEYS[family](hf_config)
  m = ml_collections.ConfigDict(dict(overrides, scan_layers=scan_layers))
  tensors = _read_tensors(hf_dir)
  if family == GPT2:  # the original GPT-2 files name the base model's tensors without a prefix
    tensors = {k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k: v
               for k, v in tensors.items()}
  flat = {}
  for hf_name, param_paths, transposed in _table(family, m):
    _require(hf_name in tensors, f'{hf_dir} lacks the tensor {hf_name}')
    tensor = tensors.pop(hf_name)
    parts = np.split(tensor.T if transposed else tensor, len(param_paths), -1)
    flat.update(zip(param_paths, parts))
  if m.tie_embeddings:
    tensors.pop('lm_head.weight', None)  # some files store the tied copy
  extra = sorted(k for k in tensors if not k.endswith(_BUFFERS))
  if extra:
    raise HFError(f'unsupported tensor {extra[0]} in {hf_dir}')
  return overrides, _params_tree(flat, m)


def to_hf(model_config, params: dict, out_dir: str):
  """Writes `params` of a decoder with `model_config` as a GPT-2 or Llama checkpoint:
  `out_dir`/config.json and model.safetensors, in the parameters' dtype."""
  family = _family_of(model_config)
  flat = _flat_params(params, model_config)
  tensors = {}
  for hf_name, param_paths, transposed in _table(family, model_config):
    tensor = np.concatenate([flat[path] for path in param_paths], axis=-1)
    tensors[hf_name] = np.ascontiguousarray(tensor.T if transposed else tensor)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dtype = str(next(iter(tensors.values())).dtype)
  safetensors.numpy.save_file(tensors, os.fspath(out / 'model.safetensors'),
                              metadata={'format': 'pt'})  # transformers expects the tag
  (out / 'config.json').write_text(
      json.dumps(_hf_config(model_config, family, dtype), indent=2) + '\n')


# --- command line --------------------------------------------------------------------------

def import_run(config, hf_dir: str, workdir: str) -> dict:
  """Writes the checkpoint in `hf_dir` to `workdir` as a params-only run of `config` (a train
  config) reshaped to it; returns the model keys that changed."""
  _require(config.model.name == 'transformer',
           f'model.name={config.model.name!r}: weights import into the decoder (transformer)')
  overrides, params = from_hf(hf_dir, scan_layers=config.model.scan_layers)
  changed = {k: v for k, v in overrides.items() if config.model[k] != v}
  config.model.update(overrides)
  transformer.validate(config.model, config)
  workdir = epath.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir / 'state', {'params': params})  # where warm_start.state_dir looks
  checkpointer.wait_until_finished()
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return changed


def export_run(workdir: str, step: int, out_dir: str):
  """Writes the parameters of the run in `workdir` at `step` (0: the newest) to `out_dir`."""
  config, _, params = sample.load(workdir, step)
  to_hf(config.model, params, out_dir)


def main(argv):
  console.quiet_libraries(console.verbose())
  command = ' '.join(argv[1:])
  needed = {'import': ('hf_dir', 'workdir'), 'export': ('workdir', 'out')}
  if command not in needed:
    console.usage_error(f'give the command: python -m tools.hf import|export [flags]; got '
                        f'{command!r}')
  missing = [f'--{name}' for name in needed[command] if not flags.FLAGS[name].value]
  if missing:
    console.usage_error(f'{command} needs {" and ".join(missing)}')
  if _STEP.value < 0:
    console.usage_error(f'--step={_STEP.value}: must be >= 0 (0: the newest)')
  cpu_runtime.configure()  # on a CPU host with libtpu installed: no TPU backend to fail
  hf_dir, workdir, out = map(paths.absolute, (_HF_DIR.value, _WORKDIR.value, _OUT.value))
  try:
    if command == 'import':
      changed = import_run(_CONFIG.value, hf_dir, workdir)
      console.log_to_file(workdir, 'hf')
      print(f'Wrote {workdir}. Train from it with the same --config and --config.init_from='
            f'{workdir} ' + ' '.join(f'--config.model.{k}={v}' for k, v in changed.items()))
    else:
      export_run(workdir, _STEP.value, out)
      print(f'Wrote {out}/config.json and model.safetensors')
  except (ValueError, OSError) as e:
    console.usage_error(e)


if __name__ == '__main__':
  _REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _HF_DIR = flags.DEFINE_string('hf_dir', None, 'import: a GPT-2 or Llama checkpoint directory.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'import: where to write; export: the run.')
  _OUT = flags.DEFINE_string('out', None, 'export: the directory to write.')
  _STEP = flags.DEFINE_integer('step', 0, 'export: the checkpoint step (0: the newest).')
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO, 'configs', 'default.py'), 'import: the config file[:presets] '
      'the weights are trained with.', lock_config=True)
  app.run(main, flags_parser=console.parse_flags)
