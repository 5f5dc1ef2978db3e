"""Model registry: `config.model.name` -> class. A new architecture is one file plus one entry."""

from models.transformer import Transformer

MODELS = {
    'transformer': Transformer,
}
