"""Prepares a text corpus for training: `python -m prepare --input=GLOB --output=DIR [flags]`.

Reads .txt / .jsonl / .parquet files (local or gs://), normalises them, drops what fails the
quality rules, scrubs PII if asked, drops exact and near duplicates, trains a tokenizer on a
sample, tokenises, and writes ArrayRecord shards, `dataset.json` and a quality report
(`report.json`, `report/*.png`). The work is an Apache Beam pipeline (prepare/pipeline.py,
the `prepare` extra); prepare/command.py is the command: its options, quiet logs, and one-line
errors. Runs on the DirectRunner (`--workers=N` processes), or on Flink / Spark / Dataflow with
Beam's options after `--` (e.g. `-- --runner=DataflowRunner`).
"""

from absl import app, flags

from hardware import console
from prepare import command

command.define_flags()
flags.adopt_module_key_flags(command)
app.run(command.main, flags_parser=console.parse_flags)
