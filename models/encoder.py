"""Bidirectional Transformer encoder (BERT style) over bytes, in Flax NNX.

The backbone (token embedding, learned positions, optional token-type embeddings, the shared
blocks of models/layers.py run bidirectionally, a final norm; with norm_position='post', BERT's
layout: the embeddings normed, post-norm blocks, no final norm) is the same for every head,
under parameter names that do not depend on the head, so a fine-tuning run can load a
pretraining run's backbone (or a BERT checkpoint, tools/hf.py) and initialise its head fresh.
Two heads:
  mlm       masked-language-model logits at every position [B, L, V]: dense + GELU + norm,
            then the (tied) embedding, as BERT's MLM head (its GELU is exact with
            activation=gelu_exact, else tanh-approximated).
  classify  logits [B, N]: the [CLS] token (position 0) through a dense + tanh pooler
            (pool='cls'), or the mean over the non-padding tokens (pool='mean'); dropout, then
            a dense classifier.

Tokens are bytes 0..255 plus specials (models/byte_vocab.py), or a tokenizer's ids
(data.tokenizer, whose [PAD] must be 0, as BERT's is); PAD (byte 0, which text never contains)
is never attended to: the blocks get a key mask `tokens != PAD_ID`. A padding position's own
output is computed but means nothing; losses and pooling must ignore it. Token types (segment
A = 0, B = 1, ...; BERT's token_type_ids) are embedded when `type_vocab_size` > 0; not given,
they are all 0 (the data pipelines give single texts).

Tensor names carry their shapes: B batch, L length, D embed, V vocab, N classes.
"""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import blocks, checks, flops, layers, platforms
from models.byte_vocab import PAD_ID, SEP_ID, VOCAB_SIZE
from parallel.sharding import constrain

HEADS = ('mlm', 'classify')
POOLS = ('cls', 'mean')


def default_config() -> ml_collections.ConfigDict:
  """Every key this model reads (`config.model`): a BERT-style encoder at CPU scale."""
  m = layers.default_config()
  m.name = 'encoder'
  m.vocab_size = VOCAB_SIZE  # 256 bytes, CLS, MASK, SEP, rounded up to a multiple of 8
  m.head = 'mlm'  # mlm (pretraining) | classify (fine-tuning)
  m.num_classes = 2  # head='classify'
  m.head_init = 'zeros'  # head='classify': zeros (first loss ln(num_classes)) | checks.INITS
  m.pool = 'cls'  # head='classify': cls (pooled [CLS] output) | mean (over non-PAD tokens)
  m.tie_embeddings = True  # head='mlm': logits against the token embedding
  m.dropout_rate = 0.1
  m.type_vocab_size = 0  # > 0: token-type (segment) embeddings, as BERT's (2); 0: none
  return m


def _seq_len(config):
  data = config.get('data')
  return None if data is None else data.get('seq_len')


def validate(m, config):
  """Raises ValueError('model.<key>: ...') for the first bad value."""
  checks.one_of(m, 'head', HEADS)
  checks.one_of(m, 'pool', POOLS)
  checks.head_init(m)
  checks.require(m.head != 'classify' or m.num_classes > 1, 'model.num_classes',
           f'must be at least 2 for head=classify, got {m.num_classes}')
  checks.require(m.vocab_size > SEP_ID, 'model.vocab_size',
           f'must hold the bytes and CLS, MASK, SEP (>= {SEP_ID + 1}), got {m.vocab_size}')
  checks.require(m.type_vocab_size >= 0, 'model.type_vocab_size',
                 f'must be >= 0, got {m.type_vocab_size}')
  layers.validate(m, norm_positions=('pre', 'post'))
  seq_len = _seq_len(config)
  checks.require(seq_len is None or seq_len <= m.max_len, 'data.seq_len',
           f'{seq_len} is longer than model.max_len={m.max_len}')


validate_sharding = checks.heads_split
lora_targets = layers.lora_targets  # the kernels finetune.lora_targets may name


def train_flops_per_example(m, config) -> float:
  """Training FLOPs of one sequence of `data.seq_len` tokens (models/flops.py's counting).
  Attention is bidirectional, so the whole L x L score matrix counts. The MLM head runs at
  every position; the classifier (and [CLS] pooler) once per example."""
  seq_len = config.data.seq_len
  per_token = (6 * flops.block_matmul_params(m) +
               flops.attention_flops_per_token(m, seq_len, causal=False))
  if m.head == 'mlm':
    return seq_len * (per_token + 6 * (m.embed_dim * m.embed_dim + m.embed_dim * m.vocab_size))
  pooler = m.embed_dim * m.embed_dim if m.pool == 'cls' else 0
  return seq_len * per_token + 6 * (pooler + m.embed_dim * m.num_classes)


class MlmHead(nnx.Module):
  """BERT's masked-LM head: dense + GELU + norm, then logits against the embedding (tied) or
  an unembedding of its own, plus a per-token bias."""

  def __init__(self, cfg, *, rngs):
    d = cfg.embed_dim
    self.transform = layers.Dense(d, d, 'embed', 'mlp', cfg, rngs=rngs)
    # BERT's checkpoints use their hidden_act here; tanh GELU otherwise, as before there was one.
    self.activation = checks.ACTIVATIONS[
        'gelu_exact' if cfg.activation == 'gelu_exact' else 'gelu']
    self.norm = layers.norm(cfg, rngs)
    self.tied = cfg.tie_embeddings
    if self.tied:
      self.bias = (nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.param_dtype),
                             logical_axes=('vocab',)) if cfg.use_bias else None)
    else:  # 16-bit activations: accumulated and returned in float32
      wide = None if cfg.dtype == 'float32' else jnp.float32
      self.unembed = layers.Dense(d, cfg.vocab_size, 'embed', 'vocab', cfg, rngs=rngs,
                                  preferred_element_type=wide)

  def __call__(self, x_BxLxD, embed: layers.Embed):
    h_BxLxD = self.norm(self.activation(self.transform(x_BxLxD)))
    if not self.tied:
      return self.unembed(h_BxLxD)
    logits_BxLxV = embed.attend(h_BxLxD)
    return logits_BxLxV if self.bias is None else logits_BxLxV + self.bias[...]


class Model(nnx.Module):
  """Token ids [B, L] -> MLM logits [B, L, V] or class logits [B, N] (float32), per `cfg.head`.

  `cfg` should come from `resolve_for_platform`; an unresolved one is resolved for JAX's
  default backend.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = platforms.model_settings(cfg)
    self.cfg = cfg
    # The backbone: the same names whatever the head.
    self.embed = layers.Embed(cfg, rngs=rngs)
    if cfg.position == 'learned':
      self.positions = layers.learned_positions(cfg, rngs)
    if cfg.type_vocab_size:
      self.token_types = nnx.Param(
          nnx.initializers.normal(cfg.init_std)(
              rngs.params(), (cfg.type_vocab_size, cfg.embed_dim), cfg.param_dtype),
          logical_axes=(None, 'embed'))
    self.blocks = blocks.Blocks(cfg, rngs=rngs, causal=False)
    self.post_norm = cfg.norm_position == 'post'
    if self.post_norm:  # BERT: the embeddings are normed, each block's output too
      self.embed_norm = layers.norm(cfg, rngs)
    else:
      self.final_norm = layers.norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    # The head.
    if cfg.head == 'mlm':
      self.mlm_head = MlmHead(cfg, rngs=rngs)
    else:
      if cfg.pool == 'cls':
        self.pooler = layers.Dense(cfg.embed_dim, cfg.embed_dim, 'embed', 'mlp', cfg, rngs=rngs)
      wide = None if cfg.dtype == 'float32' else jnp.float32
      self.classifier = layers.Dense(cfg.embed_dim, cfg.num_classes, 'embed', 'classes', cfg,
                                     rngs=rngs, init=cfg.head_init,
                                     preferred_element_type=wide)

  def __call__(self, tokens_BxL, *, train: bool = False, rngs: nnx.Rngs | None = None,
               token_types_BxL=None):
    """`rngs` carries the dropout stream; without it dropout is off (evaluation). `train` is
    accepted for the classifiers' common signature: this model has no batch statistics.
    `token_types_BxL`: each token's segment (type_vocab_size > 0); None: all 0."""
    del train
    x_BxLxD = self.encode(tokens_BxL, rngs=rngs, token_types_BxL=token_types_BxL)
    if self.cfg.head == 'mlm':
      return self.mlm_logits(x_BxLxD)
    return self.classify(x_BxLxD, tokens_BxL, rngs=rngs)

  def encode(self, tokens_BxL, *, rngs: nnx.Rngs | None = None, token_types_BxL=None):
    """The backbone: token ids [B, L] -> the last hidden states [B, L, D] (normed)."""
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.position == 'learned':
      x_BxLxD = x_BxLxD + self.positions[: tokens_BxL.shape[1]].astype(x_BxLxD.dtype)
    if self.cfg.type_vocab_size:
      types_BxL = jnp.zeros_like(tokens_BxL) if token_types_BxL is None else token_types_BxL
      x_BxLxD = x_BxLxD + self.token_types[...].astype(x_BxLxD.dtype)[types_BxL]
    if self.post_norm:
      x_BxLxD = self.embed_norm(x_BxLxD)
    x_BxLxD = self.dropout(x_BxLxD, deterministic=rngs is None, rngs=rngs)
    x_BxLxD = constrain(x_BxLxD, 'batch', 'length', 'embed')
    x_BxLxD = self.blocks(x_BxLxD, None if rngs is None else rngs.dropout(),
                          kv_mask_BxL=tokens_BxL != PAD_ID)
    return x_BxLxD if self.post_norm else self.final_norm(x_BxLxD)

  def mlm_logits(self, x_BxLxD):
    """Hidden states [B, L, D] (any L: e.g. only the masked positions) -> logits [B, L, V],
    accumulated in float32."""
    logits_BxLxV = self.mlm_head(x_BxLxD, self.embed)
    return constrain(logits_BxLxV.astype(jnp.float32), 'batch', 'length', 'vocab')

  def classify(self, x_BxLxD, tokens_BxL, *, rngs: nnx.Rngs | None = None):
    """Hidden states [B, L, D] of `tokens_BxL` -> class logits [B, N] in float32."""
    if self.cfg.pool == 'cls':
      x_BxD = jnp.tanh(self.pooler(x_BxLxD[:, 0]))
    else:  # the mean over the real tokens, in float32 (a sum over L)
      keep_BxLx1 = (tokens_BxL != PAD_ID)[..., None].astype(jnp.float32)
      total_BxD = jnp.sum(x_BxLxD.astype(jnp.float32) * keep_BxLx1, axis=1)
      x_BxD = (total_BxD / jnp.maximum(keep_BxLx1.sum(axis=1), 1.0)).astype(x_BxLxD.dtype)
    x_BxD = self.dropout(x_BxD, deterministic=rngs is None, rngs=rngs)
    return constrain(self.classifier(x_BxD).astype(jnp.float32), 'batch', 'classes')
