"""Model registry: `config.model.name` -> the model's module. A new architecture is one file
plus one entry here.

A model module exports:
  Model(cfg, *, rngs)      an `nnx.Module`; `cfg` is `config.model` resolved for the platform
                           (`platforms.resolve_for_platform`: dtype and kernels chosen, and
                           `cfg.platform` set). Parameters carry `logical_axes` metadata.
  default_config()         a ConfigDict of every key the model reads, `name` included.
  validate(cfg, config)    raises ValueError('model.<key>: ...') for the first bad value; gets the
                           whole config to check against the data's shapes.
  train_flops_per_example(cfg, config)
                           analytic FLOPs of one training example (forward and backward), the
                           numerator of MFU.
  validate_sharding(cfg, ways)   (optional) raises ValueError for dimensions the mesh must split
                           evenly; `ways(logical_name)` is how many ways it splits that axis.
  validate_stages(cfg, stages, rows)   (optional) the model splits its layers into pipeline
                           stages (mesh.stage > 1); raises ValueError for a depth or a batch of
                           `rows` per data shard that the stages or micro-batches cannot split.
Which methods a model offers beyond that is between it and its tasks (`tasks/`).
"""

from models import autoencoder, cnn, encoder, mlp, resnet, transformer, vit

MODELS = {
    'transformer': transformer,
    'cnn': cnn,
    'mlp': mlp,
    'resnet': resnet,
    'vit': vit,
    'encoder': encoder,
    'autoencoder': autoencoder,
}
