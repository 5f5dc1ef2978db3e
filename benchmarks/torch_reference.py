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

# Shared with benchmarks/torch_cnn_reference.py, which imports this module.
STEPS = flags.DEFINE_integer('steps', 100, 'Timed steps.')
WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed steps first (compilation included).')
COMPILE = flags.DEFINE_bool('compile', False, 'Time torch.compile(model) instead of eager.')

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


def time_steps(model, optimizer, loss_of_batch, batch_of_step):
  """Seconds of each of STEPS training steps after WARMUP untimed ones, and the last loss. A
  step is the forward pass and loss (`loss_of_batch(step_model, batch_of_step(i))`, with the
  model compiled under --compile), backward, clipping the global norm at 1, the update."""
  step_model = torch.compile(model) if COMPILE.value else model
  times = []
  for i in range(WARMUP.value + STEPS.value):
    batch = batch_of_step(i)
    start = time.perf_counter()
    loss = loss_of_batch(step_model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= WARMUP.value:
      times.append(time.perf_counter() - start)
  return times, loss.item()


def print_figures(setting: str, model, times, units_per_step: int, unit: str):
  """The header line (torch version, threads, `setting`), then step time, throughput, RSS."""
  step_s = statistics.median(times)
  print(f'[torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'{"torch.compile" if COMPILE.value else "eager"}, {setting}] '
        f'{sum(p.numel() for p in model.parameters()):,} params')
  print(f'  step        median {step_s * 1e3:.2f} ms (p10 {np.percentile(times, 10) * 1e3:.2f}, '
        f'p90 {np.percentile(times, 90) * 1e3:.2f}) over {len(times)} steps')
  print(f'  throughput  {units_per_step / step_s:,.0f} {unit}/s')
  print(f'  memory      peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} '
        'MiB')


def main(argv):
  del argv
  torch.manual_seed(0)
  model = Gpt()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1)
  rng = np.random.default_rng(0)
  times, loss = time_steps(
      model, optimizer, lambda m, tokens: m(tokens[:, :-1], tokens[:, 1:]),
      lambda i: torch.from_numpy(rng.integers(0, VOCAB, (BATCH, LENGTH + 1))))
  print_figures(f'gelu={_GELU.value}, batch {BATCH} x {LENGTH}, loss {loss:.4f}', model, times,
                BATCH * LENGTH, 'tokens')


if __name__ == '__main__':
  _GELU = flags.DEFINE_enum('gelu', 'none', ['none', 'tanh'], "F.gelu's approximation.")
  app.run(main)
