"""Tokenizers: training writes a file that loads, text survives encode/decode, bad files fail."""

import pytest

from data import tokenizers

WORDS = ('value', 'total', 'count', 'name', 'items', 'result', 'index', 'buffer', 'naïve café')
TEXTS = [f'def {WORDS[i % 9]}_{i}({WORDS[i * 7 % 9]}):\n    return {WORDS[i * 5 % 9]} * {i}\n'
         for i in range(2000)]
SAMPLE = 'def f(x):\n\treturn  x**2  # ünïcode ✓ 日本\n\n'


@pytest.mark.parametrize('kind', tokenizers.KINDS)
def test_trained_tokenizer_round_trips_and_compresses(kind, tmp_path):
  path = tokenizers.train(TEXTS, kind, 400, str(tmp_path))
  tokenizer = tokenizers.load(path)
  assert tokenizer.vocab_size == 400 and 0 <= tokenizer.eos_id < 400
  assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE  # unseen characters too
  assert tokenizer.eos_id not in tokenizer.encode(TEXTS[7])
  assert len(tokenizer.encode(TEXTS[7])) < len(TEXTS[7].encode()) / 2  # it learned the corpus


@pytest.mark.parametrize('kind', tokenizers.KINDS)
def test_training_is_deterministic(kind, tmp_path):
  first = tokenizers.train(TEXTS, kind, 400, str(tmp_path / 'a'))
  second = tokenizers.train(TEXTS, kind, 400, str(tmp_path / 'b'))
  with open(first, 'rb') as a, open(second, 'rb') as b:
    assert a.read() == b.read()


def test_bytes_are_the_default():
  tokenizer = tokenizers.load('')
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (256, 0)
  assert tokenizer.encode('é').tolist() == [0xC3, 0xA9]
  assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
  (tmp_path / 'broken.json').write_text('{"not": "a tokenizer"}')
  (tmp_path / 'broken.model').write_bytes(b'\x00garbage')
  for spec, expected in (('vocab.txt', 'neither bytes nor'),
                         (str(tmp_path / 'none.model'), 'cannot read'),
                         (str(tmp_path / 'broken.json'), 'not a tokenizer.json'),
                         (str(tmp_path / 'broken.model'), 'not a SentencePiece model')):
    with pytest.raises(ValueError, match=f'^data.tokenizer: .*{expected}') as e:
      tokenizers.load(spec)
    assert '\n' not in str(e.value)


def test_a_vocabulary_larger_than_the_texts_allow_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError, match=r'^tokenizer: SentencePiece cannot train .* 5000: .*<= \d+'):
    tokenizers.train(TEXTS[:20], 'sentencepiece', 5000, str(tmp_path))
