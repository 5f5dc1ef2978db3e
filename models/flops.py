"""Analytic training FLOPs of the transformer, from its config: the numerator of MFU.

Per token, a training step (forward + backward) costs 6 FLOPs per matmul parameter: 2 forward,
4 backward (gradients of the input and of the weight). Matmul parameters are the attention and
MLP kernels and the unembedding (a matmul even when tied to the embedding); the embedding lookup
is a gather, and norms, biases, softmax and the optimizer are left out, as is usual.

Attention's two products (q @ k^T and probs @ v) add, per token and layer, 2 * 2 * T * H * K
forward for T keys, H query heads of width K, so 12 * T * H * K for training. Causal convention:
we count HALF of that, 6 * T * H * K, because a causal mask makes the upper half of the score
matrix unnecessary: a block-sparse kernel (splash/flash) skips it, and an implementation that
computes and then masks it gets no credit for that waste. MFU is thus never inflated by masked
work (MaxText counts it the same way; PaLM's appendix counts the full 12 * T * H * K).
A bidirectional encoder (`causal=False`) computes and uses the whole matrix: it counts all of it.
"""


def block_matmul_params(model_config) -> int:
  """Parameters of the Transformer blocks (attention and MLP kernels), all layers."""
  m = model_config
  head_dim = m.embed_dim // m.num_heads
  attention = 2 * m.embed_dim * head_dim * (m.num_heads + m.num_kv_heads)  # q, out; k, v
  mlp = (3 if m.mlp == 'swiglu' else 2) * m.embed_dim * m.mlp_dim
  return m.num_layers * (attention + mlp)


def matmul_params(model_config) -> int:
  """Parameters that take part in a matmul per token: attention, MLP, unembedding."""
  return block_matmul_params(model_config) + model_config.embed_dim * model_config.vocab_size


def attention_flops_per_token(model_config, seq_len: int, causal: bool = True) -> float:
  """Score and value products, forward and backward: half the T x T matrix if `causal`."""
  m = model_config
  head_dim = m.embed_dim // m.num_heads
  return (6 if causal else 12) * m.num_layers * seq_len * m.num_heads * head_dim


def train_flops_per_token(model_config, seq_len: int, causal: bool = True) -> float:
  """FLOPs of one training step per token of a sequence of `seq_len` tokens."""
  return 6 * matmul_params(model_config) + attention_flops_per_token(model_config, seq_len,
                                                                     causal)


def train_flops_per_step(config) -> float:
  """FLOPs of one optimiser update on the whole global batch (all devices together)."""
  tokens = config.data.global_batch_size * config.data.seq_len
  return tokens * train_flops_per_token(config.model, config.data.seq_len)
