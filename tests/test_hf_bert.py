"""BERT weights in and out (tools/hf.py) and the encoder features they need.

Against small random `transformers` BERTs (no download), skipped without torch and
transformers as tests/test_hf.py's are. The tokenizer is a tiny WordPiece tokenizer.json built
here with `tokenizers`.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import encoder_classify, encoder_mlm
from data import mlm, tokenizers
from models import encoder
from tests import test_hf
from tests.conftest import REPO
from tools import hf

TOLERANCE = 1e-4  # float32 hidden states and logits, max abs difference
VOCAB = 300  # the model's; the tokenizer's ids are fewer
WORDS = ('the', 'cat', 'dog', 'sat', 'on', 'mat', 'a', 'good', 'bad', 'film', '##s', '##ing')
SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def _torch_and_transformers():
  return pytest.importorskip('torch'), pytest.importorskip('transformers')


def _write_tokenizer(directory, specials=SPECIALS):
  """A WordPiece tokenizer.json as BERT's (lower-cased, [CLS] x [SEP]), with `specials` first."""
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top,line-too-long
  letters = [chr(c) for c in range(ord('a'), ord('z') + 1)]
  vocab = {t: i for i, t in enumerate(specials + WORDS + tuple(letters) +
                                      tuple('##' + c for c in letters))}
  tokenizer = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', special_tokens=[('[CLS]', vocab['[CLS]']),
                                               ('[SEP]', vocab['[SEP]'])])
  tokenizer.save(str(directory / 'tokenizer.json'))


def _bert(directory, head, num_labels=2):
  """A random BERT saved to `directory`; the model. Every tensor random (LayerNorm scales
  near 1), so a misplaced one shows."""
  torch, transformers = _torch_and_transformers()
  torch.manual_seed(0 if head == 'mlm' else 1)
  config = transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=80, max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-3,
      num_labels=num_labels, attn_implementation='eager')
  model = (transformers.BertForMaskedLM if head == 'mlm' else
           transformers.BertForSequenceClassification)(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.1 * torch.randn_like(p) + float(name.endswith('LayerNorm.weight')))
  model.save_pretrained(directory, safe_serialization=True)
  _write_tokenizer(directory)
  return model.eval()


def _inputs():
  """Token ids (row 1 padded at the end) and token types (segment B from position 12)."""
  tokens = np.random.default_rng(1).integers(1, VOCAB, (2, 24))
  tokens[1, 20:] = encoder.PAD_ID
  types = np.zeros_like(tokens)
  types[:, 12:] = 1
  return tokens, types


def _hf_outputs(model, tokens, types):
  """(last hidden states, logits) of an HF BERT."""
  torch, _ = _torch_and_transformers()
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(tokens != encoder.PAD_ID),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


@pytest.fixture(scope='module')
def bert_dirs(tmp_path_factory):
  """{head: (directory, HF hidden states, HF logits)} for a BertForMaskedLM and a
  BertForSequenceClassification (3 labels, with the pooler)."""
  tokens, types = _inputs()
  made = {}
  for head, labels in (('mlm', 2), ('classify', 3)):
    directory = tmp_path_factory.mktemp(head)
    made[head] = (directory, *_hf_outputs(_bert(directory, head, labels), tokens, types))
  return made


def _model_config(head, **keys):
  config = (encoder_mlm if head == 'mlm' else encoder_classify).get_config('tiny')
  config.model.update(dtype='float32', **keys)
  return config.model


def _podium_outputs(m, params, tokens, types):
  """(last hidden states, logits) of podium's encoder, compiled (op by op is slow)."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: encoder.Model(m, rngs=nnx.Rngs(params=0))), nnx.Param)

  @jax.jit
  def outputs(params, tokens, types):
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    hidden = model.encode(tokens, token_types_BxL=types)
    return hidden, (model.mlm_logits(hidden) if m.head == 'mlm' else
                    model.classify(hidden, tokens))

  return tuple(map(np.asarray, outputs(params, tokens, types)))


def _random_params(m, seed=0):
  return test_hf._random_params(m, seed, encoder)  # pylint: disable=protected-access


def _bert_keys(**keys):
  """The model keys of a BERT-shaped tiny encoder."""
  return {**dict(norm_position='post', activation='gelu_exact', type_vocab_size=2,
                norm_eps=1e-3, vocab_size=VOCAB), **keys}


# --- against transformers ------------------------------------------------------------------

@pytest.mark.parametrize('head, scan_layers', [('mlm', False), ('mlm', True),
                                               ('classify', False)])
def test_imported_bert_gives_the_hf_hidden_states_and_logits(bert_dirs, head, scan_layers):
  directory, hidden, logits = bert_dirs[head]
  overrides, params = hf.from_hf(directory, scan_layers=scan_layers, head=head, num_classes=3)
  assert overrides['norm_position'] == 'post' and overrides['activation'] == 'gelu_exact'
  m = _model_config(head, scan_layers=scan_layers, num_classes=3, **overrides)
  tokens, types = _inputs()
  ours = _podium_outputs(m, params, tokens, types)
  differences = [float(np.abs(a - b).max()) for a, b in zip(ours, (hidden, logits))]
  print(f'HF -> podium bert {head} scan_layers={scan_layers}: max abs differences hidden '
        f'{differences[0]:.2e}, logits {differences[1]:.2e}')
  assert max(differences) <= TOLERANCE
  if scan_layers or head != 'mlm':
    return
  # What is read matters: with tanh GELU, BERT's usual epsilon or no token types, far off.
  missed = lambda m, types: max(np.abs(a - b).max() for a, b in zip(
      _podium_outputs(m, params, tokens, types), (hidden, logits)))
  near = max(TOLERANCE / 10, 100 * max(differences))
  assert missed(m, 0 * types) > near
  for wrong in (dict(activation='gelu'), dict(norm_eps=1e-12)):
    wrong_m = m.copy_and_resolve_references()
    wrong_m.update(wrong)
    assert missed(wrong_m, types) > near, wrong


@pytest.mark.parametrize('head', ['mlm', 'classify'])
def test_exported_bert_gives_podium_outputs_in_transformers(tmp_path, head):
  torch, transformers = _torch_and_transformers()
  m = _model_config(head, **_bert_keys(num_classes=3))
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  auto = (transformers.AutoModelForMaskedLM if head == 'mlm' else
          transformers.AutoModelForSequenceClassification)
  model = auto.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation='eager')
  tokens, types = _inputs()
  theirs = _hf_outputs(model.eval(), tokens, types)
  ours = _podium_outputs(m, params, tokens, types)
  differences = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)]
  print(f'podium -> HF bert {head}: max abs differences hidden {differences[0]:.2e}, logits '
        f'{differences[1]:.2e}')
  assert max(differences) <= TOLERANCE


# --- no torch ------------------------------------------------------------------------------

@pytest.mark.parametrize('head', ['mlm', 'classify'])
def test_bert_files_and_back_are_exact(tmp_path, head):
  m = _model_config(head, **_bert_keys(tie_embeddings=head == 'classify'))
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path)
  overrides, back = hf.from_hf(tmp_path, head=head, num_classes=m.num_classes)
  assert {k: m[k] for k in overrides} == overrides
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_bert_files_of_other_layouts_read_the_same(tmp_path):
  """A BertForPreTraining file converted from Google's release (LayerNorm gamma and beta, the
  next-sentence head, the tied decoder stored) and a BertModel file (no 'bert.' prefix)."""
  m = _model_config('mlm', **_bert_keys())
  params = _random_params(m)
  hf.to_hf(m, params, tmp_path / 'mlm')
  tensors = safetensors.numpy.load_file(tmp_path / 'mlm' / 'model.safetensors')
  old = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                  'LayerNorm.beta'): v
         for k, v in tensors.items()}
  old.update({'cls.seq_relationship.weight': np.ones((2, 32), np.float32),
              'cls.predictions.decoder.weight': tensors['bert.embeddings.word_embeddings.weight'],
              'bert.embeddings.position_ids': np.arange(32)[None]})
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'mlm' / 'config.json').read_text())
  safetensors.numpy.save_file(old, tmp_path / 'old' / 'model.safetensors')
  jax.tree.map(np.testing.assert_array_equal, hf.from_hf(tmp_path / 'old')[1], params)
  base = {k.removeprefix('bert.'): v for k, v in tensors.items() if k.startswith('bert.')}
  (tmp_path / 'base').mkdir()
  (tmp_path / 'base' / 'config.json').write_text((tmp_path / 'mlm' / 'config.json').read_text())
  safetensors.numpy.save_file(base, tmp_path / 'base' / 'model.safetensors')
  _, back = hf.from_hf(tmp_path / 'base', head='classify')  # the backbone; no pooler there
  assert set(back) == set(params) - {'mlm_head'}
  jax.tree.map(np.testing.assert_array_equal, back['blocks'], params['blocks'])


def test_an_encoder_without_token_types_exports_one_of_zeros(tmp_path):
  m = _model_config('mlm', **_bert_keys(type_vocab_size=0))
  hf.to_hf(m, _random_params(m), tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['type_vocab_size'] == 1
  tensors = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  types = tensors['bert.embeddings.token_type_embeddings.weight']
  assert types.shape == (1, m.embed_dim) and not types.any()


def _bert_config(directory, **keys):
  directory.mkdir(exist_ok=True)
  config = dict(model_type='bert', vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
  (directory / 'config.json').write_text(json.dumps(dict(config, **keys)))
  return directory


@pytest.mark.parametrize('keys, error', [
    (dict(position_embedding_type='relative_key'),
     r"^position_embedding_type='relative_key' is not supported \(only 'absolute'\)$"),
    (dict(hidden_act='relu'), r"^hidden_act='relu' is not supported"),
    (dict(is_decoder=True), r'^is_decoder=True is not supported'),
])
def test_bert_features_podium_lacks_are_one_line_errors_naming_the_hf_key(tmp_path, keys, error):
  with pytest.raises(hf.HFError, match=error):
    hf.from_hf(_bert_config(tmp_path, **keys))


def test_export_refuses_an_encoder_no_bert_has(tmp_path):
  m = _model_config('mlm', **_bert_keys(norm_position='pre'))
  with pytest.raises(hf.HFError, match="^model.norm_position='pre' has no equivalent in a bert"):
    hf.to_hf(m, _random_params(m), tmp_path)
  m = _model_config('classify', **_bert_keys(pool='mean'))
  with pytest.raises(hf.HFError, match="^model.pool='mean' has no equivalent in a bert"):
    hf.to_hf(m, _random_params(m), tmp_path)


def test_decoders_refuse_post_norm():
  from configs import default  # pylint: disable=g-import-not-at-top
  from models import transformer  # pylint: disable=g-import-not-at-top
  config = default.get_config('tiny')
  config.model.norm_position = 'post'
  with pytest.raises(ValueError, match=r"^model.norm_position: 'post' is not one of pre$"):
    transformer.validate(config.model, config)


def test_the_tokenizer_gives_bert_rows_and_masks(tmp_path):
  _write_tokenizer(tmp_path)
  vocab = tokenizers.Vocabulary(str(tmp_path / 'tokenizer.json'))
  assert (vocab.pad, vocab.cls, vocab.sep, vocab.mask) == (0, 2, 3, 4)
  ids = vocab.tokenizer.encode('The cats sat')
  row = vocab.classification_row(b'The cats sat', 8)
  assert row.tolist() == [2, *ids, 3] + [0] * (6 - len(ids))
  assert vocab.classification_row(b'the cat sat on the mat', 4).tolist() == [2, 5, 6, 3]
  documents = [b'the cat sat on the mat ' * 3, b'a good film ' * 5]
  batch = next(iter(mlm.mlm_batches(documents, seq_len=12, global_batch_size=4, seed=0,
                                    mask_rate=0.3, vocab=vocab, shuffle=False,
                                    prefetch_batches=0)))
  inputs, targets, weights = batch['inputs'], batch['targets'], batch['weights']
  assert (inputs[:, 0] == vocab.cls).all() and (inputs == vocab.mask).any()
  chosen = weights > 0
  assert set(targets[chosen].tolist()) <= set(range(vocab.random_ids[0], vocab.size))
  assert not chosen[:, 0].any() and (targets[~chosen] == vocab.pad).all()
  assert ((inputs == vocab.sep).sum(axis=1) == 1).all()  # one [SEP] closes each row
  _write_tokenizer(tmp_path, ('[UNK]', '[PAD]', '[CLS]', '[SEP]', '[MASK]'))
  with pytest.raises(ValueError, match=r'^data.tokenizer: .* needs \[PAD\], \[CLS\], \[SEP\] and '
                     r'\[MASK\], \[PAD\] = 0 .* its ids are \[1, 2, 3, 4\]$'):
    tokenizers.Vocabulary(str(tmp_path / 'tokenizer.json'))


# --- the commands, as users run them -------------------------------------------------------

def _run(args, cwd):
  result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, 'PYTHONPATH': REPO,
                                                         'XLA_FLAGS': ''})  # one device: quick
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_import_then_fine_tune_from_the_imported_weights(bert_dirs, tmp_path):
  """`tools.hf import` into encoder_classify, then train.py with what it prints, in a scratch
  folder with relative paths: the run loads every imported array (all but none) and reads
  its texts with the BERT tokenizer; export writes it back as a BERT classifier."""
  directory = bert_dirs['classify'][0]
  config = f'--config={REPO}/configs/encoder_classify.py:tiny'
  imported = _run(['-m', 'tools.hf', 'import', f'--hf_dir={directory}', '--workdir=imported',
                   config, '--config.model.num_classes=3'], tmp_path)
  overrides = imported.stdout.split('init_from=')[1].split()[1:]
  assert f'--config.data.tokenizer={tmp_path}/imported/tokenizer.json' in overrides
  rows = [{'text': f'{w} film {i}', 'label': i % 3} for i, w in enumerate(WORDS * 4)]
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  run = _run([f'{REPO}/train.py', '--workdir=run', config,
              '--config.init_from=imported', '--config.model.num_classes=3',
              '--config.data.source=jsonl', '--config.data.path=train.jsonl',
              '--config.data.test_percent=20', '--config.train.steps=3',
              '--config.train.eval_every=0',
              *overrides], tmp_path)
  output = run.stdout + run.stderr
  total = len(jax.tree.leaves(_random_params(_model_config('classify', **_bert_keys(
      num_classes=3)))))
  assert f'imported: {total} of the {total} parameter arrays loaded' in output
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['tokenizer'] == f'{tmp_path}/imported/tokenizer.json'
  hf.export_run(str(tmp_path / 'run'), 0, tmp_path / 'exported')  # the command, in-process
  assert (tmp_path / 'exported' / 'tokenizer.json').exists()
  written = json.loads((tmp_path / 'exported' / 'config.json').read_text())
  assert written['architectures'] == ['BertForSequenceClassification']
  assert written['num_labels'] == 3
