"""Default job: a byte-level GPT trained on the Python standard library's own source.

Usage: `python train.py --config=configs/default.py[:preset,preset...] --config.<key>=<value>`.
Presets (comma-separated, applied left to right):
  gpt2 | llama          model style (gpt2 is the default)
  dp | fsdp | fsdp_tp   parallelism within a slice: data, fully sharded, fully sharded x tensor
  llama3_8b | llama_1b  Llama 3 shapes (sequence 8192, batch 256), scanned, remat, FSDP
  multislice            data parallel across slices (DCN), FSDP within each slice (ICI)
  tiny                  a minimal model and short run, for tests and smoke checks
Every key is declared here; the config is locked, so a misspelt override is an error.
"""

import ml_collections

# Logical axis -> mesh axes. Each mesh axis is used at most once per array: a later rule for an
# axis already taken leaves that dimension unsharded, which is how activations (batch over
# data+fsdp) and parameters (embed over fsdp) share one table.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),  # the stacked axis of scanned blocks: each device holds every layer
)


def model_config():
  m = ml_collections.ConfigDict()
  m.name = 'transformer'
  m.vocab_size = 256  # bytes; byte 0 separates documents
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.embed_dim = 128
  m.mlp_dim = 512
  m.max_len = 128
  m.position = 'learned'  # learned | rope
  m.rope_theta = 10000.0
  m.norm = 'layernorm'  # layernorm | rmsnorm
  m.mlp = 'gelu'  # gelu | swiglu
  m.use_bias = True
  m.tie_embeddings = True
  m.dropout_rate = 0.0
  m.dtype = 'auto'  # activations: auto (TPU/GPU bfloat16, CPU float32) | float32 | bfloat16
  m.param_dtype = 'float32'  # parameters and optimizer state
  m.scan_layers = False  # one scanned layer body: compile time independent of depth
  m.remat = 'none'  # none | full | dots (save matmul outputs) | names (save `remat_names`)
  m.remat_names = ('attention_out', 'mlp_out')  # kept by remat=names (transformer.REMAT_NAMES)
  # auto | cpu | xla | cudnn | splash (auto: splash on TPU, cudnn on GPU, cpu on CPU)
  m.attention = 'auto'
  m.loss_chunk = 0  # > 0: logits and loss this many positions at a time (never all of [B,L,V])
  return m


def data_config():
  d = ml_collections.ConfigDict()
  d.source = 'stdlib'  # stdlib | files | tfds
  d.files = ''  # glob for source=files, e.g. '/data/books/**/*.txt'
  d.eval_percent = 2  # files whose path hashes below this percentage form the validation split
  d.tfds_name = ''  # for source=tfds, e.g. 'lm1b'
  d.tfds_train_split = 'train'
  d.tfds_eval_split = 'test'
  d.tfds_text_key = 'text'
  d.seq_len = 128
  d.global_batch_size = 32
  d.shuffle_seed = 0
  # Documents are dealt into this many streams, each owned by one process (0: one per process).
  # Fix it (to a multiple of every process count you use) to keep the same batches when the
  # number of hosts changes.
  d.num_streams = 0
  d.max_bad_fraction = 0.01  # stop if more of the records read are unusable (checked after 100)
  d.worker_threads = 2  # threads that prefetch batches
  d.prefetch_batches = 4
  return d


def optim_config():
  o = ml_collections.ConfigDict()
  o.learning_rate = 3e-3
  o.warmup_steps = 50
  o.schedule = 'cosine'  # cosine | linear | constant | exponential | inverse_time
  o.final_lr_fraction = 0.1  # cosine and linear decay end at learning_rate * this
  o.decay_rate = 0.5  # exponential: lr halves every `decay_steps`
  o.decay_steps = 1000
  o.inverse_time_b = 0.01  # inverse_time: lr0 / (1 + b*t)^g, t counted after warmup
  o.inverse_time_power = 0.5
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1  # masked off norms, biases and embeddings
  o.grad_clip_norm = 1.0
  return o


def train_config():
  t = ml_collections.ConfigDict()
  t.steps = 600
  t.grad_accum_steps = 1
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.on_save_error = 'warn'  # warn | stop, when a checkpoint cannot be written (e.g. disk full)
  t.stop_after = 0  # stop this run after this step (0: run to `steps`); resuming continues
  t.nonfinite_policy = 'skip'  # skip | rollback | stop, for non-finite loss/grads or a spike
  t.spike_sigmas = 0.0  # > 0: also reject a loss this many std devs above its running mean
  t.spike_window = 100  # steps in the running loss statistics; spikes are checked after these
  t.hang_factor = 10.0  # a step this many times the median step time is a hang (0: no watchdog)
  t.hang_min_seconds = 300.0  # ... but never less than this
  t.debug_nan_at_step = 0  # fault injection: make this step's loss and gradients NaN
  t.debug_hang_at_step = 0  # fault injection: hang the host loop at this step
  t.num_samples = 3
  t.sample_length = 160
  t.sample_temperature = 0.8
  t.sample_prompts = ('def ', 'import ', 'class ')
  return t


def mesh_config():
  mesh = ml_collections.ConfigDict()
  # Sizes within a slice (ICI); -1 fills in the devices the other axes leave.
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  # Sizes across slices (DCN) of a multi-slice job; an axis's full size is ici * dcn.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_tensor = 1
  mesh.rules = RULES
  return mesh


def apply_preset(config, preset):
  m, mesh = config.model, config.mesh
  if preset == 'gpt2':
    pass  # the defaults
  elif preset == 'llama':
    m.position, m.norm, m.mlp = 'rope', 'rmsnorm', 'swiglu'
    m.use_bias, m.tie_embeddings = False, False
    m.num_kv_heads = max(1, m.num_heads // 2)
    # SwiGLU has three matrices: 8/3 of the width keeps a 4x GELU MLP's parameter count.
    m.mlp_dim = 32 * round(8 * m.embed_dim / 3 / 32)
  elif preset == 'dp':
    mesh.data, mesh.fsdp, mesh.tensor = -1, 1, 1
  elif preset == 'fsdp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
  elif preset == 'fsdp_tp':
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 2
  elif preset == 'multislice':  # data parallel across slices, FSDP within each
    mesh.data, mesh.fsdp, mesh.tensor = 1, -1, 1
    mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor = -1, 1, 1
  elif preset in ('llama3_8b', 'llama_1b'):
    _llama_size(config, preset)
  elif preset == 'tiny':
    m.num_layers, m.num_heads, m.num_kv_heads, m.embed_dim, m.mlp_dim = 2, 4, 4, 32, 128
    m.max_len = config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.train.update(steps=8, log_every=1, eval_every=4, checkpoint_every=4, eval_batches=1,
                        num_samples=1, sample_length=16)
    config.optim.warmup_steps = 2
  else:
    raise ValueError(f'unknown preset {preset!r}; choose from gpt2, llama, llama3_8b, llama_1b, '
                     'dp, fsdp, fsdp_tp, multislice, tiny')


def _llama_size(config, preset):
  """Llama 3 shapes for pod runs and ahead-of-time compilation: scanned and rematerialised."""
  apply_preset(config, 'llama')
  m = config.model
  if preset == 'llama3_8b':
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 4096, 32, 8, 14336
  else:  # Llama 3.2 1B
    m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.mlp_dim = 16, 2048, 32, 8, 8192
  m.vocab_size, m.rope_theta = 128256, 500000.0
  m.max_len = config.data.seq_len = 8192
  config.data.global_batch_size = 256
  m.scan_layers, m.remat, m.loss_chunk = True, 'full', 1024
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1


def get_config(presets: str = ''):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  config.data = data_config()
  config.optim = optim_config()
  config.train = train_config()
  config.mesh = mesh_config()
  for preset in filter(None, presets.split(',')):
    apply_preset(config, preset)
  return config
