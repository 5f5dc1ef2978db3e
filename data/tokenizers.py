"""Tokenizers: bytes (the default), SentencePiece `.model` files and Hugging Face `tokenizer.json`.

`load(spec)` gives one from '' / 'bytes' or a path (local or gs://); `train(texts, kind, ...)`
learns a SentencePiece or byte-level BPE vocabulary and writes its file. Every tokenizer has
`vocab_size`, `eos_id` (the token that ends each document in training data), `encode` (no eos
added) and `decode`, and `spec`, the string `load` was given.

The encoder's rows of token ids are here too: `Vocabulary` (bytes and podium's specials,
models/byte_vocab.py, or a tokenizer.json's [CLS]/[SEP]/[PAD]/[MASK]) and `cls_row`.
"""

import io
from collections.abc import Iterable

import numpy as np
from etils import epath

from models.byte_vocab import CLS_ID, MASK_ID, PAD_ID, SEP_ID, VOCAB_SIZE

KINDS = ('sentencepiece', 'bpe')
BPE_EOS = '<|endoftext|>'  # the one special token of a BPE vocabulary trained here
# End-of-document tokens of widely used tokenizer.json files, tried in this order.
_HF_EOS_NAMES = (BPE_EOS, '<|end_of_text|>', '</s>', '<eos>', '[SEP]')


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255; byte 0 (never in text) ends a document."""

  vocab_size, eos_id, spec = 256, 0, 'bytes'

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.int64).clip(0, 255).astype(np.uint8)).decode('utf-8',
                                                                                  'replace')


class SentencePieceTokenizer:
  """A SentencePiece model; its eos (`</s>` by default) ends a document."""

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top; only this tokenizer needs it
    self.spec = path
    try:
      self._model = sentencepiece.SentencePieceProcessor(model_proto=_read(path))
    except RuntimeError:
      raise ValueError(f'data.tokenizer: {path} is not a SentencePiece model') from None
    self.vocab_size, self.eos_id = self._model.get_piece_size(), self._model.eos_id()
    if self.eos_id < 0:
      raise ValueError(f'data.tokenizer: {path} has no end-of-sequence piece (trained with '
                       'eos_id=-1); podium ends every document with one')

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8', 'replace') if isinstance(text, bytes) else text
    return np.asarray(self._model.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._model.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json); its end-of-text token ends a document."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top; only this tokenizer needs it
    self.spec = path
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(_read(path).decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except; the library raises bare Exceptions
      raise ValueError(f'data.tokenizer: {path} is not a tokenizer.json file ({e})') from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    ids = (self._tokenizer.token_to_id(name) for name in _HF_EOS_NAMES)
    self.eos_id = next((i for i in ids if i is not None), None)
    if self.eos_id is None:
      raise ValueError(f'data.tokenizer: {path} has none of the end-of-text tokens '
                       f'{", ".join(_HF_EOS_NAMES)}; podium ends every document with one')

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8', 'replace') if isinstance(text, bytes) else text
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, token: str) -> int | None:
    """The id of `token` (e.g. '[CLS]'), None if the vocabulary lacks it."""
    return self._tokenizer.token_to_id(token)


def load(spec: str):
  """'' or 'bytes': bytes; a path ending .model: SentencePiece; ending .json: Hugging Face."""
  if spec in ('', 'bytes'):
    return ByteTokenizer()
  if spec.endswith('.model'):
    return SentencePieceTokenizer(spec)
  if spec.endswith('.json'):
    return HuggingFaceTokenizer(spec)
  raise ValueError(f'data.tokenizer: {spec!r} is neither bytes nor a SentencePiece .model nor a '
                   'Hugging Face .json file')


def _read(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except OSError as e:
    raise ValueError(f'data.tokenizer: cannot read {path}: {e.strerror or e}') from None


def train(texts: Iterable[str], kind: str, vocab_size: int, out_dir: str) -> str:
  """Learns a `kind` vocabulary of `vocab_size` tokens from `texts`; writes `tokenizer.model`
  (SentencePiece) or `tokenizer.json` (BPE) into `out_dir` and returns its path."""
  if kind not in KINDS:
    raise ValueError(f'tokenizer: {kind!r} is not one of {", ".join(KINDS)}')
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if kind == 'sentencepiece':
    path, data = out / 'tokenizer.model', _train_sentencepiece(texts, vocab_size)
  else:
    path, data = out / 'tokenizer.json', _train_bpe(texts, vocab_size)
  path.write_bytes(data)
  return str(path)


def _train_sentencepiece(texts, vocab_size) -> bytes:
  """A BPE SentencePiece model that keeps text as it is (no normalisation, so decoding gives
  back the text) with byte fallback (no text is ever out of vocabulary). It learns from lines:
  pieces never span one, and newlines are byte pieces. One thread: the same model every time."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  model = io.BytesIO()  # not a file: the model would then record its path
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type='bpe',
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name='identity',
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2)
  except RuntimeError as e:  # e.g. more pieces asked for than the texts hold
    raise ValueError(f'tokenizer: SentencePiece cannot train a vocabulary of {vocab_size}: '
                     f'{str(e).splitlines()[0].split("] ")[-1]}') from None
  return model.getvalue()


def _train_bpe(texts, vocab_size) -> bytes:
  """A byte-level BPE vocabulary (GPT-2 style) with one special token, BPE_EOS."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer.to_str().encode('utf-8')


def encode_for_classification(text: bytes, seq_len: int) -> np.ndarray:
  """int32[seq_len]: CLS, the first seq_len - 1 bytes of `text`, then PAD."""
  return cls_row(np.frombuffer(text[:seq_len - 1], np.uint8), seq_len)


def cls_row(body: np.ndarray, seq_len: int) -> np.ndarray:
  """CLS, then the token ids `body`, then PAD up to `seq_len`."""
  row = np.full(seq_len, PAD_ID, np.int32)
  row[0] = CLS_ID
  row[1:1 + len(body)] = body
  return row


class Vocabulary:
  """The encoder's token ids of texts: bytes and podium's specials (spec '' or 'bytes'), or a
  tokenizer.json and its own; `pad`, `cls`, `sep`, `mask` ids, `size` (the ids used), and
  `random_ids` (the range masking draws random replacements from)."""

  def __init__(self, spec: str = ''):
    self.tokenizer = load(spec)
    if spec in ('', 'bytes'):
      self.pad, self.cls, self.sep, self.mask = PAD_ID, CLS_ID, SEP_ID, MASK_ID
      self.size, self.random_ids, self.ends_with_sep = VOCAB_SIZE, (1, 256), False
      return
    need = '[PAD], [CLS], [SEP] and [MASK]'
    if not isinstance(self.tokenizer, HuggingFaceTokenizer):
      raise ValueError(f'data.tokenizer: the encoder needs bytes or a tokenizer.json with {need}')
    ids = [self.tokenizer.token_id(f'[{name}]') for name in ('PAD', 'CLS', 'SEP', 'MASK')]
    if None in ids or ids[0] != PAD_ID:
      raise ValueError(f'data.tokenizer: {spec} needs {need}, [PAD] = {PAD_ID} (the encoder '
                       f'never attends to {PAD_ID}); its ids are {ids}')
    self.pad, self.cls, self.sep, self.mask = ids
    self.size, self.ends_with_sep = self.tokenizer.vocab_size, True
    self.random_ids = (max(ids) + 1, self.size)  # BERT's vocabularies put specials first

  def body_len(self, seq_len: int) -> int:
    """Token ids a row of `seq_len` holds besides its specials."""
    return seq_len - 1 - self.ends_with_sep

  def row(self, body: np.ndarray, seq_len: int) -> np.ndarray:
    """int32[seq_len]: CLS, `body` (at most body_len), [SEP] for a tokenizer, then PAD."""
    body = body[:self.body_len(seq_len)]
    if not self.ends_with_sep:
      return cls_row(body, seq_len)
    row = np.full(seq_len, self.pad, np.int32)
    row[0], row[1 + len(body)] = self.cls, self.sep
    row[1:1 + len(body)] = body
    return row

  def classification_row(self, text: bytes, seq_len: int) -> np.ndarray:
    """A text's row: as `encode_for_classification` for bytes, else its tokens in `row`."""
    if not self.ends_with_sep:
      return encode_for_classification(text, seq_len)
    return self.row(self.tokenizer.encode(text), seq_len)
