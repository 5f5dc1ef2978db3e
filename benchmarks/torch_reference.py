"""The small model in PyTorch, timed the same way: a parity figure from this machine, today.

`python benchmarks/torch_reference.py [--compile] [--gelu=tanh]` needs PyTorch (a CPU build,
e.g. `pip install torch`); it is not a project dependency. CPU speed here drifts by a quarter
from hour to hour (shared hosts), so compare it with `python benchmarks/step_time.py
--configs=small` run right before or after, not with a figure from another day.

The model is nanoGPT's GPT at its CPU settings, i.e. `bench_configs.small_config()`: 4 layers,
4 heads, width 128 (MLP 512), vocab 65, sequence 64, batch 12, learned positions, LayerNorm,
biases, tied embeddings, dropout 0; AdamW (betas 0.9/0.95, weight decay 0.1) after clipping
the gradient norm at 1. Its GELU is exact (`--gelu=tanh` for the approximation podium's GPT-2
style uses). A step is forward, backward, clip and optimizer update, in float32 on all cores,
eager unless `--compile` (`torch.compile`; the first steps compile and are not timed).
"""

import resource
import statistics
import time

import numpy as np
import torch
from absl import app, flags
from torch import nn
from torch.nn import functional as F

_STEPS = flags.DEFINE_integer('steps', 100, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed steps first (compilation included).')
_COMPILE = flags.DEFINE_bool('compile', False, 'Time torch.compile(model) instead of eager.')
_GELU = flags.DEFINE_enum('gelu', 'none', ['none', 'tanh'], "F.gelu's approximation.")

VOCAB, LENGTH, WIDTH, HEADS, LAYERS, BATCH = 65, 64, 128, 4, 4, 12


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.attn_norm, self.mlp_norm = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
    self.qkv, self.attn_out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
    self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

  def forward(self, x):
    b, t, d = x.shape
    heads = [z.view(b, t, HEADS, d // HEADS).transpose(1, 2)
             for z in self.qkv(self.attn_norm(x)).split(d, dim=2)]
    y = F.scaled_dot_product_attention(*heads, is_causal=True)
    x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
    return x + self.down(F.gelu(self.up(self.mlp_norm(x)), approximate=_GELU.value))


class Gpt(nn.Module):

  def __init__(self):
    super().__init__()
    self.embed, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(LENGTH, WIDTH)
    self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
    self.final_norm = nn.LayerNorm(WIDTH)
    self.unembed = nn.Linear(WIDTH, VOCAB, bias=False)
    self.unembed.weight = self.embed.weight  # tied

  def forward(self, inputs, targets):
    x = self.embed(inputs) + self.positions(torch.arange(inputs.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.unembed(self.final_norm(x))
    return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def main(argv):
  del argv
  torch.manual_seed(0)
  model = Gpt()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1)
  step_model = torch.compile(model) if _COMPILE.value else model
  rng = np.random.default_rng(0)
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    tokens = torch.from_numpy(rng.integers(0, VOCAB, (BATCH, LENGTH + 1)))
    start = time.perf_counter()
    loss = step_model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  print(f'[torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'{"torch.compile" if _COMPILE.value else "eager"}, gelu={_GELU.value}] '
        f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {BATCH} x '
        f'{LENGTH}, loss {loss.item():.4f}')
  print(f'  step        median {step_s * 1e3:.2f} ms (p10 {np.percentile(times, 10) * 1e3:.2f}, '
        f'p90 {np.percentile(times, 90) * 1e3:.2f}) over {len(times)} steps')
  print(f'  throughput  {BATCH * LENGTH / step_s:,.0f} tokens/s')
  print(f'  memory      peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} '
        'MiB')


if __name__ == '__main__':
  app.run(main)
