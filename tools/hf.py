"""Hugging Face weights in and out: GPT-2 and Llama checkpoints <-> the decoder (transformer.py),
BERT checkpoints <-> the encoder (encoder.py).

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

BERT (`--config=configs/encoder_mlm.py` or `encoder_classify.py`): BertForMaskedLM,
BertForPreTraining, BertModel and BertForSequenceClassification files. The backbone becomes the
encoder with norm_position=post (the embeddings' LayerNorm is `embed_norm`), exact GELU
(hidden_act 'gelu' is `activation=gelu_exact`) and token types; `cls.predictions` becomes the
MLM head (head=mlm needs it), `bert.pooler` the [CLS] pooler and `classifier` the classifier
(head=classify: each imported when the file has it, with as many classes as model.num_classes;
else initialised fresh by `init_from`). The next-sentence head (`cls.seq_relationship`) is left
out. The file's tokenizer.json is copied to W and named as data.tokenizer in W/config.json;
export writes the run's back.
"""

import json
import os
import shutil

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from hardware import console, cpu_runtime, paths
from data import tokenizers
from models import encoder, transformer
from tools import sample

GPT2, LLAMA, BERT = 'gpt2', 'llama', 'bert'
_ARCHITECTURES = {GPT2: 'GPT2LMHeadModel', LLAMA: 'LlamaForCausalLM'}
# Buffers some checkpoints carry that hold no weights (causal masks, rotary frequencies,
# BERT's position and token-type ids).
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq', '.position_ids',
            '.token_type_ids')


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


# BERT's hidden_act -> model.activation: erf GELU, or its tanh approximation.
_BERT_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}


def _bert_model(c: dict) -> dict:
  """BERT config.json -> the encoder keys that build its shape."""
  _supported(c, 'hidden_act', *_BERT_ACTIVATIONS)
  _supported(c, 'position_embedding_type', 'absolute')
  _supported(c, 'is_decoder', False)
  _supported(c, 'add_cross_attention', False)
  heads = c['num_attention_heads']
  return dict(num_layers=c['num_hidden_layers'], num_heads=heads, num_kv_heads=heads,
              embed_dim=c['hidden_size'], mlp_dim=c['intermediate_size'],
              max_len=c['max_position_embeddings'], vocab_size=c['vocab_size'],
              type_vocab_size=c.get('type_vocab_size', 2), position='learned',
              norm='layernorm', norm_position='post', norm_eps=c.get('layer_norm_eps', 1e-12),
              mlp='gelu', activation=_BERT_ACTIVATIONS[c.get('hidden_act') or 'gelu'],
              use_bias=True, tie_embeddings=c.get('tie_word_embeddings', True))


_MODEL_KEYS = {GPT2: _gpt2_model, LLAMA: _llama_model, BERT: _bert_model}


def _bert_config(m, dtype: str) -> dict:
  """Encoder keys -> BERT's config.json (the inverse of `_bert_model`); head=classify writes a
  BertForSequenceClassification with its number of labels."""
  act = {ours: hf_name for hf_name, ours in reversed(_BERT_ACTIVATIONS.items())}
  classify = dict(num_labels=m.num_classes) if m.head == 'classify' else {}
  return dict(model_type=BERT, architectures=[
      'BertForSequenceClassification' if classify else 'BertForMaskedLM'], dtype=dtype,
              vocab_size=m.vocab_size, hidden_size=m.embed_dim, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
              max_position_embeddings=m.max_len, type_vocab_size=max(m.type_vocab_size, 1),
              layer_norm_eps=m.norm_eps, hidden_act=act.get(m.activation),
              position_embedding_type='absolute', tie_word_embeddings=m.tie_embeddings,
              pad_token_id=0, **classify)


def _hf_config(m, family: str, dtype: str) -> dict:
  """Model keys -> the family's config.json (the inverse of `_MODEL_KEYS[family]`)."""
  if family == BERT:
    return _bert_config(m, dtype)
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
  family = BERT if m.name == 'encoder' else GPT2 if m.position == 'learned' else LLAMA
  _require(family != BERT or m.head == 'mlm' or m.pool == 'cls',
           "model.pool='mean' has no equivalent in a bert checkpoint (it needs 'cls')")
  # type_vocab_size 0 is written as one all-zero token type, which adds nothing.
  back = _MODEL_KEYS[family](_hf_config(m, family, 'float32'))
  for key, value in back.items():
    _require(m[key] == value or (key, m[key]) == ('type_vocab_size', 0),
             f'model.{key}={m[key]!r} has no equivalent in a {family} checkpoint (it needs '
             f'{value!r})')
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
    BERT: ('bert.', 'bert.encoder.layer.{}.',
           {'embeddings.word_embeddings.weight': 'embed.embedding',
            'embeddings.position_embeddings.weight': 'positions',
            'embeddings.token_type_embeddings.weight': 'token_types',
            'embeddings.LayerNorm.weight': 'embed_norm.scale',
            'embeddings.LayerNorm.bias': 'embed_norm.bias'},
           {'attention.self.query': ('attention.query',),
            'attention.self.key': ('attention.key',),
            'attention.self.value': ('attention.value',),
            'attention.output.dense': ('attention.out',),
            'attention.output.LayerNorm': ('attn_norm',), 'intermediate.dense': ('mlp.up',),
            'output.dense': ('mlp.down',), 'output.LayerNorm': ('mlp_norm',)}),
}
_BERT_FRESH = ('bert.pooler.', 'classifier.')  # head=classify: optional in a file
# BERT's heads per model.head: HF module -> podium module (a *norm, or a dense layer).
_BERT_HEADS = {
    'mlm': {'cls.predictions.transform.dense': 'mlm_head.transform',
            'cls.predictions.transform.LayerNorm': 'mlm_head.norm'},
    'classify': {'bert.pooler.dense': 'pooler', 'classifier': 'classifier'},
}


def _table(family: str, m) -> list[tuple[str, tuple, bool]]:
  """(HF tensor name, podium paths, transposed) for every tensor of the model. Several paths:
  the HF tensor is their concatenation along its last axis. Block paths start with the layer
  index. Llama's Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out] already."""
  top, block, top_names, modules = _LAYOUT[family]
  path = lambda dotted, *lead: (*lead, *dotted.split('.'))
  table = [(top + name, (path(ours),), False) for name, ours in top_names.items()]
  if family == BERT:
    table += _bert_head_table(m)
  elif not m.tie_embeddings:
    table.append(('lm_head.weight', (('unembed', 'kernel'),), True))
  for i in range(m.num_layers):
    for module, ours in modules.items():
      weight = 'scale' if ours[0].endswith('norm') else 'kernel'
      transposed = family in (LLAMA, BERT) and weight == 'kernel'
      table.append((f'{block.format(i)}{module}.weight',
                    tuple(path(o, i) + (weight,) for o in ours), transposed))
      if m.use_bias:
        table.append((f'{block.format(i)}{module}.bias',
                      tuple(path(o, i) + ('bias',) for o in ours), False))
  return table


def _bert_head_table(m) -> list[tuple[str, tuple, bool]]:
  """BERT's head tensors for model.head (as `_table`); Linear weights [out, in]."""
  path = lambda dotted: tuple(dotted.split('.'))
  table = []
  for module, ours in _BERT_HEADS[m.head].items():
    weight = 'scale' if ours.endswith('norm') else 'kernel'
    table += [(f'{module}.weight', (path(ours) + (weight,),), weight == 'kernel'),
              (f'{module}.bias', (path(ours) + ('bias',),), False)]
  if m.head == 'mlm' and m.tie_embeddings:
    table.append(('cls.predictions.bias', (('mlm_head', 'bias'),), False))
  elif m.head == 'mlm':
    table += [('cls.predictions.decoder.weight', (('mlm_head', 'unembed', 'kernel'),), True),
              ('cls.predictions.decoder.bias', (('mlm_head', 'unembed', 'bias'),), False)]
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


def _bert_tensors(tensors: dict, m, num_classes: int) -> dict:
  """A BERT file's tensors, named as in BertForMaskedLM, less those model.head does not use
  (and the next-sentence head); a classifier for another number of classes is left out."""
  base = ('embeddings.', 'encoder.', 'pooler.')  # BertModel files name them without 'bert.'
  tensors = {'bert.' + k if k.startswith(base) else k: v for k, v in tensors.items()}
  # Files converted from Google's TensorFlow release (bert-base-uncased) name LayerNorm's
  # weight and bias gamma and beta.
  tensors = {k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                     'LayerNorm.bias'): v
             for k, v in tensors.items()}
  unused = (('bert.pooler.', 'classifier.') if m.head == 'mlm' else ('cls.predictions.',))
  tensors = {k: v for k, v in tensors.items()
             if not k.startswith(unused + ('cls.seq_relationship.',))}
  if m.head == 'mlm':  # predictions.bias is decoder.bias; files keep either or both
    bias = tensors.pop('cls.predictions.decoder.bias', None)
    bias = tensors.pop('cls.predictions.bias', bias)
    if m.tie_embeddings:
      tensors.pop('cls.predictions.decoder.weight', None)  # the word embeddings
    if bias is not None:
      tensors['cls.predictions.bias' if m.tie_embeddings else 'cls.predictions.decoder.bias'] = bias
  elif tensors.get('classifier.weight', np.zeros((num_classes, 0))).shape[0] != num_classes:
    tensors = {k: v for k, v in tensors.items() if not k.startswith('classifier.')}
  return tensors


def from_hf(hf_dir: str, scan_layers: bool = False, head: str = 'mlm',
            num_classes: int = 2) -> tuple[dict, dict]:
  """(model key overrides, params tree) of the GPT-2, Llama or BERT checkpoint in `hf_dir`, in
  the checkpoint's dtype; `scan_layers`: with the blocks stacked. BERT: the tensors of the
  encoder's `head` (mlm | classify with `num_classes`); a classify head's pooler and classifier
  are left out when the file has none."""
  hf_dir = epath.Path(hf_dir)
  hf_config = _HFConfig(hf_dir / 'config.json')
  family = hf_config.get('model_type')
  _require(family in _MODEL_KEYS, f'model_type={family!r} in {hf_dir}/config.json: only gpt2, '
           'llama and bert are supported')
  overrides = _MODEL_KEYS[family](hf_config)
  m = ml_collections.ConfigDict(dict(overrides, scan_layers=scan_layers, head=head))
  tensors = _read_tensors(hf_dir)
  if family == GPT2:  # the original GPT-2 files name the base model's tensors without a prefix
    tensors = {k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k: v
               for k, v in tensors.items()}
  if family == BERT:
    tensors = _bert_tensors(tensors, m, num_classes)
  flat = {}
  for hf_name, param_paths, transposed in _table(family, m):
    if family == BERT and hf_name.startswith(_BERT_FRESH) and hf_name not in tensors:
      continue  # initialised by init_from
    _require(hf_name in tensors, f'{hf_dir} lacks the tensor {hf_name}')
    tensor = tensors.pop(hf_name)
    parts = np.split(tensor.T if transposed else tensor, len(param_paths), -1)
    flat.update(zip(param_paths, parts))
  if m.tie_embeddings and family != BERT:
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
  if family == BERT and not model_config.type_vocab_size:  # one token type that adds nothing
    flat[('token_types',)] = np.zeros_like(flat[('positions',)][:1])
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
  config) reshaped to it; returns the config keys that changed ('model.<key>', and for BERT
  'data.tokenizer' when `hf_dir` has a tokenizer.json)."""
  models = {'transformer': transformer, 'encoder': encoder}
  _require(config.model.name in models, f'model.name={config.model.name!r}: weights import '
           'into the decoder (transformer) or the encoder')
  m = config.model
  family = _HFConfig(epath.Path(hf_dir) / 'config.json').get('model_type')
  _require((family == BERT) == (m.name == 'encoder'), f'model_type={family!r}: bert imports '
           'into the encoder (--config=configs/encoder_mlm.py or encoder_classify.py), gpt2 '
           'and llama into the decoder (transformer)')
  overrides, params = from_hf(hf_dir, scan_layers=m.scan_layers, head=m.get('head', 'mlm'),
                              num_classes=m.get('num_classes', 2))
  changed = {f'model.{k}': v for k, v in overrides.items() if m[k] != v}
  m.update(overrides)
  workdir = epath.Path(workdir).absolute()
  if (epath.Path(hf_dir) / 'tokenizer.json').exists() and config.model.name == 'encoder':
    changed['data.tokenizer'] = config.data.tokenizer = _copy_tokenizer(hf_dir, workdir)
  models[config.model.name].validate(m, config)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir / 'state', {'params': params})  # where warm_start.state_dir looks
  checkpointer.wait_until_finished()
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return changed


def _copy_tokenizer(hf_dir: str, workdir: epath.Path) -> str:
  """Copies `hf_dir`'s tokenizer.json into `workdir`; its path there. The encoder masks
  token 0 as padding, so the tokenizer's [PAD] must be 0."""
  source = os.fspath(epath.Path(hf_dir) / 'tokenizer.json')
  pad = tokenizers.HuggingFaceTokenizer(source).token_id('[PAD]')
  _require(pad == encoder.PAD_ID, f'{source}: [PAD] is token {pad}; the encoder pads with '
           f'{encoder.PAD_ID}')
  workdir.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(source, workdir / 'tokenizer.json')
  return os.fspath(workdir / 'tokenizer.json')


def export_run(workdir: str, step: int, out_dir: str):
  """Writes the parameters of the run in `workdir` at `step` (0: the newest) to `out_dir`,
  with the run's tokenizer.json (data.tokenizer) if it has one."""
  config, _, params = sample.load(workdir, step, decoder=False)
  to_hf(config.model, params, out_dir)
  if config.data.get('tokenizer', '').endswith('.json'):
    shutil.copyfile(config.data.tokenizer, epath.Path(out_dir) / 'tokenizer.json')


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
            f'{workdir} ' + ' '.join(f'--config.{k}={v}' for k, v in changed.items()))
    else:
      export_run(workdir, _STEP.value, out)
      print(f'Wrote {out}/config.json and model.safetensors')
  except (ValueError, OSError) as e:
    console.usage_error(e)


if __name__ == '__main__':
  _REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _HF_DIR = flags.DEFINE_string('hf_dir', None, 'import: a GPT-2, Llama or BERT checkpoint '
                                'directory.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'import: where to write; export: the run.')
  _OUT = flags.DEFINE_string('out', None, 'export: the directory to write.')
  _STEP = flags.DEFINE_integer('step', 0, 'export: the checkpoint step (0: the newest).')
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO, 'configs', 'default.py'), 'import: the config file[:presets] '
      'the weights are trained with.', lock_config=True)
  app.run(main, flags_parser=console.parse_flags)
