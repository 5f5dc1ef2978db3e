"""Hugging Face config.json <-> podium's model keys, per family (GPT-2, Llama, BERT): what
tools/hf.py reads to build a model of a checkpoint's shape, and writes on export. A key podium
has no equivalent for is an HFError naming it."""

import json

from etils import epath

GPT2, LLAMA, BERT = 'gpt2', 'llama', 'bert'
_ARCHITECTURES = {GPT2: 'GPT2LMHeadModel', LLAMA: 'LlamaForCausalLM'}


class HFError(ValueError):
  """A checkpoint or model that has no equivalent on the other side."""


def require(ok: bool, message: str):
  if not ok:
    raise HFError(message)


class HFConfig(dict):
  """A config.json's keys; one it lacks that is needed is an HFError naming the file."""

  def __init__(self, path: epath.Path):
    super().__init__(json.loads(path.read_text()))
    self.path = path

  def __missing__(self, key):
    raise HFError(f'{self.path} lacks the key {key!r}')


def supported(c: dict, key: str, *values):
  """Raises naming `key` unless the HF config leaves it unset or sets one of `values`."""
  if c.get(key) is not None and c[key] not in values:
    raise HFError(f'{key}={c[key]!r} is not supported (only {", ".join(map(repr, values))})')


def gpt2_model(c: dict) -> dict:
  """GPT-2 config.json -> the model keys that build its shape."""
  supported(c, 'activation_function', 'gelu_new', 'gelu_pytorch_tanh')  # gelu, tanh-approximated
  supported(c, 'scale_attn_weights', True)
  supported(c, 'scale_attn_by_inverse_layer_idx', False)
  supported(c, 'add_cross_attention', False)
  return dict(num_layers=c['n_layer'], num_heads=c['n_head'], num_kv_heads=c['n_head'],
              embed_dim=c['n_embd'], mlp_dim=c.get('n_inner') or 4 * c['n_embd'],
              max_len=c['n_positions'], vocab_size=c['vocab_size'], position='learned',
              norm='layernorm', norm_eps=c.get('layer_norm_epsilon', 1e-5), mlp='gelu',
              activation='gelu', use_bias=True, tie_embeddings=c.get('tie_word_embeddings', True))


def llama_model(c: dict) -> dict:
  """Llama config.json -> the model keys that build its shape."""
  heads = c['num_attention_heads']
  supported(c, 'hidden_act', 'silu')
  supported(c, 'attention_bias', False)
  supported(c, 'mlp_bias', False)
  supported(c, 'head_dim', c['hidden_size'] // heads)
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
  require(rope_type == 'llama3', f'{rope_key}: rope_type={rope_type!r} is not supported (only '
          "'default' and 'llama3')")
  missing = [k for k in _LLAMA3_KEYS if rope.get(k) is None]
  require(not missing, f'{rope_key}: rope_type llama3 lacks {", ".join(missing)}')
  keys = {ours: float(rope[hf_key]) for hf_key, ours in _LLAMA3_KEYS.items()}
  keys['rope_original_max_len'] = int(keys['rope_original_max_len'])
  return dict(rope_scaling='llama3', **keys)


# BERT's hidden_act -> model.activation: erf GELU, or its tanh approximation.
_BERT_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}


def bert_model(c: dict) -> dict:
  """BERT config.json -> the encoder keys that build its shape."""
  supported(c, 'hidden_act', *_BERT_ACTIVATIONS)
  supported(c, 'position_embedding_type', 'absolute')
  supported(c, 'is_decoder', False)
  supported(c, 'add_cross_attention', False)
  heads = c['num_attention_heads']
  return dict(num_layers=c['num_hidden_layers'], num_heads=heads, num_kv_heads=heads,
              embed_dim=c['hidden_size'], mlp_dim=c['intermediate_size'],
              max_len=c['max_position_embeddings'], vocab_size=c['vocab_size'],
              type_vocab_size=c.get('type_vocab_size', 2), position='learned',
              norm='layernorm', norm_position='post', norm_eps=c.get('layer_norm_eps', 1e-12),
              mlp='gelu', activation=_BERT_ACTIVATIONS[c.get('hidden_act') or 'gelu'],
              use_bias=True, tie_embeddings=c.get('tie_word_embeddings', True))


MODEL_KEYS = {GPT2: gpt2_model, LLAMA: llama_model, BERT: bert_model}


def bert_config(m, dtype: str) -> dict:
  """Encoder keys -> BERT's config.json (the inverse of `bert_model`); head=classify writes a
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


def hf_config(m, family: str, dtype: str) -> dict:
  """Model keys -> the family's config.json (the inverse of `MODEL_KEYS[family]`)."""
  if family == BERT:
    return bert_config(m, dtype)
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


def family_of(m) -> str:
  """The family whose checkpoints hold this model; raises naming the first key that has no
  equivalent there."""
  family = BERT if m.name == 'encoder' else GPT2 if m.position == 'learned' else LLAMA
  require(family != BERT or m.head == 'mlm' or m.pool == 'cls',
          "model.pool='mean' has no equivalent in a bert checkpoint (it needs 'cls')")
  # type_vocab_size 0 is written as one all-zero token type, which adds nothing.
  back = MODEL_KEYS[family](hf_config(m, family, 'float32'))
  for key, value in back.items():
    require(m[key] == value or (key, m[key]) == ('type_vocab_size', 0),
            f'model.{key}={m[key]!r} has no equivalent in a {family} checkpoint (it needs '
            f'{value!r})')
  return family
