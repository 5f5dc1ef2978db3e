"""The byte-level vocabulary the encoder (models/encoder.py) and its text data (data/text.py,
data/mlm.py) share: token ids 0..255 are the bytes themselves, byte 0 (never in text) pads, and
the specials follow the bytes. It sits in models/, the lowest layer that both may import, so the
data pipeline reads its ids without importing a model."""

PAD_ID = 0  # padding: never attended to
CLS_ID = 256  # first token of an example; its output is what pool='cls' classifies
MASK_ID = 257  # a token hidden from the masked-language model
SEP_ID = 258  # separates the segments of a sentence pair
VOCAB_SIZE = 264  # the bytes, CLS, MASK and SEP, rounded up to a multiple of 8
