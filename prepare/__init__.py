"""The offline preparation tool: `python -m prepare --input=GLOB --output=DIR` turns a text corpus
into a prepared dataset (ArrayRecord token shards, `dataset.json`, a quality report) that training
reads with `data.source=arrayrecord` (data/sources.py). No training run imports this package."""
