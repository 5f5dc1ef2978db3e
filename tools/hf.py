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
    which `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads; a LoRA run
    (finetune.lora_rank > 0) is written with its adapters merged into the kernels.

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
from models import encoder, lora, transformer
from tools import sample
from tools.hf_configs import (BERT, GPT2, LLAMA, MODEL_KEYS, HFConfig, HFError, family_of,
                               hf_config, require)

# Buffers some checkpoints carry that hold no weights (causal masks, rotary frequencies,
# BERT's position and token-type ids).
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq', '.position_ids',
            '.token_type_ids')


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
  require((hf_dir / files[0]).exists(), f'{hf_dir / files[0]} does not exist')
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
  saved = HFConfig(hf_dir / 'config.json')
  family = saved.get('model_type')
  require(family in MODEL_KEYS, f'model_type={family!r} in {hf_dir}/config.json: only gpt2, '
          'llama and bert are supported')
  overrides = MODEL_KEYS[family](saved)
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
    require(hf_name in tensors, f'{hf_dir} lacks the tensor {hf_name}')
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
  family = family_of(model_config)
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
      json.dumps(hf_config(model_config, family, dtype), indent=2) + '\n')


# --- command line --------------------------------------------------------------------------

def import_run(config, hf_dir: str, workdir: str) -> dict:
  """Writes the checkpoint in `hf_dir` to `workdir` as a params-only run of `config` (a train
  config) reshaped to it; returns the config keys that changed ('model.<key>', and for BERT
  'data.tokenizer' when `hf_dir` has a tokenizer.json)."""
  models = {'transformer': transformer, 'encoder': encoder}
  require(config.model.name in models, f'model.name={config.model.name!r}: weights import '
          'into the decoder (transformer) or the encoder')
  m = config.model
  family = HFConfig(epath.Path(hf_dir) / 'config.json').get('model_type')
  require((family == BERT) == (m.name == 'encoder'), f'model_type={family!r}: bert imports '
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
  require(pad == encoder.PAD_ID, f'{source}: [PAD] is token {pad}; the encoder pads with '
          f'{encoder.PAD_ID}')
  workdir.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(source, workdir / 'tokenizer.json')
  return os.fspath(workdir / 'tokenizer.json')


def export_run(workdir: str, step: int, out_dir: str):
  """Writes the parameters of the run in `workdir` at `step` (0: the newest) to `out_dir`,
  with the run's tokenizer.json (data.tokenizer) if it has one; a LoRA run's adapters merged
  into its kernels."""
  config, _, params = sample.load(workdir, step, decoder=False)
  params = lora.merge(params, lora.model_config(config.model, config.get('finetune')))
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
