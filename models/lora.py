"""LoRA (Hu et al. 2021): low-rank adapters on a frozen model's dense layers.

The `finetune` section's `lora_rank`, `lora_alpha` and `lora_targets` are the one place they are
set; `model_config` copies them into the model config, whose dense layers (models/layers.py) then
compute y = x W + lora_alpha / lora_rank * (x A) B for the layers named in TARGETS.
`merge` folds trained adapters into the kernels, giving the plain model's parameters.
"""

import jax.numpy as jnp
import ml_collections

# The dense layers LoRA can adapt: attention's projections and the MLP's kernels.
TARGETS = ('query', 'key', 'value', 'out', 'up', 'gate', 'down')
ADAPTERS = ('lora_a', 'lora_b')  # the parameter names of a layer's adapters


def model_config(model_config, finetune) -> ml_collections.ConfigDict:
  """`model_config` with the `finetune` section's LoRA settings, which the dense layers read;
  as it is when LoRA is off (lora_rank 0, or a config from before LoRA)."""
  rank = finetune.get('lora_rank', 0) if finetune else 0
  if not rank:
    return model_config
  m = ml_collections.ConfigDict(model_config.to_dict())
  m.lora_rank, m.lora_alpha = rank, float(finetune.lora_alpha)
  m.lora_targets = tuple(t.strip() for t in finetune.lora_targets.split(',') if t.strip())
  return m


def merge(params: dict, cfg) -> dict:
  """A params tree of a model with LoRA adapters (`cfg` from `model_config`) as the plain model's:
  each adapted kernel W + lora_alpha / lora_rank * A B, the adapters dropped."""
  if not isinstance(params, dict):
    return params
  merged = {k: merge(v, cfg) for k, v in params.items() if k not in ADAPTERS}
  if 'lora_a' in params:
    kernel = params['kernel']
    delta = jnp.matmul(jnp.asarray(params['lora_a'], jnp.float32),
                       jnp.asarray(params['lora_b'], jnp.float32))  # stacked layers: batched
    merged['kernel'] = (kernel + cfg.lora_alpha / cfg.lora_rank * delta).astype(kernel.dtype)
  return merged
