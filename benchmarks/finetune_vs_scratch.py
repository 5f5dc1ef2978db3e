"""What pretraining buys: the encoder fine-tuned from a masked-LM run against the same encoder
trained from scratch, on the same classification task and steps.

`python benchmarks/finetune_vs_scratch.py [--workdir_root=/tmp/podium_finetune]
[--pretrain_steps=2000] [--finetune_steps=1000] [--presets=tiny] [--extra='--config.K=V ...']`

Three train.py runs, one after the other, each in its own process and fresh workdir (an earlier
run there is deleted first; output in WORKDIR/train.log):
  (a) mlm        configs/encoder_mlm.py for --pretrain_steps steps, in WORKDIR_ROOT/mlm;
  (b) finetuned  configs/encoder_classify.py for --finetune_steps steps with
                 `--config.init_from=WORKDIR_ROOT/mlm` (its backbone; the classifier is new),
                 in WORKDIR_ROOT/finetuned;
  (c) scratch    the same config and steps without init_from, in WORKDIR_ROOT/scratch;
  (d) bert       with --bert=DIR (a BERT checkpoint) or --bert=random (a BertForMaskedLM of the
                 classify config's shape, transformers' random init, written to
                 WORKDIR_ROOT/bert_hf; needs torch and transformers): `python -m tools.hf
                 import` into WORKDIR_ROOT/bert_imported, then (b)'s run from it with the keys
                 import prints (post-LN, exact GELU, token types, its tokenizer if DIR has one),
                 in WORKDIR_ROOT/bert.
  (e) bert_lora  (d)'s run with LoRA adapters (--lora_rank, on every attention and MLP kernel)
                 on the frozen imported backbone, in WORKDIR_ROOT/bert_lora.
--presets go to both configs (`tiny` for a smoke check), --extra (repeatable, split like a shell
line, last so it wins) to all three runs: it must keep the encoder's shape the same in both
configs, or (b) refuses the checkpoint. A step count below a config's warmup shrinks the warmup
to a tenth of the steps.

Prints figures only: for (a) the final eval MLM loss and accuracy; for (b), (c) and (d) the
final and best (with its step) eval accuracy, loss and macro-F1, the wall time of the whole
process, the median training throughput, the trained parameters, the median step time and the
process's peak resident memory; then (b), (d) and (e) minus (c). Runs with
benchmarks/classifier_accuracy.py's `run_train` and `summary`.
"""

import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import classifier_accuracy as bench  # pylint: disable=wrong-import-position

_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/podium_finetune',
                                    'Runs go to WORKDIR_ROOT/{mlm,finetuned,scratch}, deleted '
                                    'first.')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 2000, 'Masked-LM steps (0: the '
                                       "config's).")
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 1000, 'Classification steps, for both '
                                       "the fine-tuned and the scratch run (0: the config's).")
_PRESETS = flags.DEFINE_string('presets', '', 'Presets for both configs, e.g. tiny.')
_EXTRA = flags.DEFINE_multi_string('extra', [], 'More train.py flags for all three runs.')
_BERT = flags.DEFINE_string('bert', '', "(d): a BERT checkpoint directory, or 'random'.")
_LORA_RANK = flags.DEFINE_integer('lora_rank', 8, "(e)'s adapter rank (0: no (e)).")
_POLL = flags.DEFINE_float('poll', 0.5, "Seconds between looks at the runs' metrics.")

_CLASSIFY_KEYS = {'eval/accuracy': 'max', 'eval/loss': 'min', 'eval/macro_f1': 'max'}


def _run(label, name, steps, more_flags=()):
  """Trains configs/<name>.py (with --presets) in WORKDIR_ROOT/<label>; prints what it ran."""
  name = f'{name}:{_PRESETS.value}' if _PRESETS.value else name
  train_flags = [*bench.steps_flags(name, steps), *more_flags, *bench.extra_flags(_EXTRA.value)]
  print(f'({label}) {name}: train.py {shlex.join(train_flags)}', flush=True)
  workdir = os.path.join(_WORKDIR_ROOT.value, label)
  return bench.run_train(bench.config_arg(name), workdir, train_flags, _POLL.value)


def _report(label, run, keys, unit):
  if run.returncode:
    print(f'({label}) {bench.failure(run)} ({run.workdir}/train.log)', flush=True)
    return
  rate, _, n = bench.train_rates(run.records, unit)
  data = run.config()['data']
  per_step = data['global_batch_size'] * (data['seq_len'] if unit == 'tokens' else 1)
  print(f'({label}) {bench.summary(run, keys)}; wall {run.wall_s / 60:.2f} min; '
        f'{rate:,.0f} {unit}/s (median of {n} logged steps), {per_step / rate * 1e3:.1f} ms/step; '
        f'{_trained(run):,} parameters trained; peak RSS {run.peak_rss_mib:,.0f} MiB; '
        f'others used {run.others_cpus:.2f} CPUs', flush=True)


def _trained(run) -> int:
  """The parameters the run trained: all, or those train.py announced as trained."""
  found = re.search(r'([\d,]+) of them trained', run.log)
  return int(found.group(1).replace(',', '')) if found else bench.param_count(run) or 0


def _loaded(run) -> str:
  """train.py's 'Starting from ...: N of M parameter arrays loaded' line, shortened."""
  for line in run.log.splitlines():
    if line.startswith('Starting from') and 'loaded' in line:
      return line.split(': ', 1)[1]
  return 'no warm start announced'


def _random_bert(directory: str) -> str:
  """A BertForMaskedLM of encoder_classify's shape (with --presets), transformers' random init,
  saved to `directory`."""
  import transformers  # pylint: disable=g-import-not-at-top; only --bert=random needs it
  from configs import encoder_classify  # pylint: disable=g-import-not-at-top
  m = encoder_classify.get_config(_PRESETS.value).model
  config = transformers.BertConfig(
      vocab_size=m.vocab_size, hidden_size=m.embed_dim, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
      max_position_embeddings=m.max_len)
  transformers.BertForMaskedLM(config).save_pretrained(directory)
  return directory


def _import_bert() -> list[str] | None:
  """Imports --bert into WORKDIR_ROOT/bert_imported; the train.py flags import printed, or None
  (its error printed)."""
  hf_dir = _BERT.value
  if hf_dir == 'random':
    hf_dir = _random_bert(os.path.join(_WORKDIR_ROOT.value, 'bert_hf'))
  name = f'encoder_classify:{_PRESETS.value}' if _PRESETS.value else 'encoder_classify'
  workdir = os.path.join(_WORKDIR_ROOT.value, 'bert_imported')
  bench.fresh_workdir(workdir)  # import writes into an empty one
  imported = subprocess.run(
      [sys.executable, '-m', 'tools.hf', 'import', f'--hf_dir={hf_dir}',
       f'--workdir={workdir}',
       f'--config={bench.config_arg(name)}', *bench.extra_flags(_EXTRA.value)],
      cwd=bench.REPO, capture_output=True, text=True, check=False)
  if imported.returncode:
    print(f'(bert) import FAILED: {imported.stderr.strip()[-300:]}', flush=True)
    return None
  return ['--config.init_from=' + imported.stdout.split('init_from=')[1].split()[0],
          *imported.stdout.split('init_from=')[1].split()[1:]]


def main(argv):
  del argv
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  mlm = _run('mlm', 'encoder_mlm', _PRETRAIN_STEPS.value)
  _report('mlm', mlm, {'eval/loss': 'min', 'eval/accuracy': 'max'}, 'tokens')
  runs = {}
  if not mlm.returncode:
    runs['finetuned'] = _run('finetuned', 'encoder_classify', _FINETUNE_STEPS.value,
                             [f'--config.init_from={mlm.workdir}'])
    _report('finetuned', runs['finetuned'], _CLASSIFY_KEYS, 'examples')
    if not runs['finetuned'].returncode:
      print(f'(finetuned) {_loaded(runs["finetuned"])}', flush=True)
  runs['scratch'] = _run('scratch', 'encoder_classify', _FINETUNE_STEPS.value)
  _report('scratch', runs['scratch'], _CLASSIFY_KEYS, 'examples')
  bert_flags = _import_bert() if _BERT.value else None
  if bert_flags:
    runs['bert'] = _run('bert', 'encoder_classify', _FINETUNE_STEPS.value, bert_flags)
    _report('bert', runs['bert'], _CLASSIFY_KEYS, 'examples')
    if not runs['bert'].returncode:
      print(f'(bert) {_loaded(runs["bert"])}', flush=True)
    if _LORA_RANK.value:
      lora = [f'--config.finetune.lora_rank={_LORA_RANK.value}',
              '--config.finetune.lora_targets=query,key,value,out,up,down']
      runs['bert_lora'] = _run('bert_lora', 'encoder_classify', _FINETUNE_STEPS.value,
                               bert_flags + lora)
      _report('bert_lora', runs['bert_lora'], _CLASSIFY_KEYS, 'examples')
  for label in ('finetuned', 'bert', 'bert_lora'):
    if label in runs and not (runs[label].returncode or runs['scratch'].returncode):
      _print_deltas(label, runs[label], runs['scratch'])


def _print_deltas(label, run, scratch_run):
  """`label` minus scratch: each eval figure's final and best."""
  deltas = []
  for key, mode in _CLASSIFY_KEYS.items():
    tuned, scratch = (bench.final_and_best(r.records, key, mode) for r in (run, scratch_run))
    if tuned and scratch:
      deltas.append(f'{key.removeprefix("eval/")} {tuned[0] - scratch[0]:+.4f} final, '
                    f'{tuned[1] - scratch[1]:+.4f} best')
  print(f'{label} - scratch: {"; ".join(deltas)}', flush=True)

if __name__ == '__main__':
  app.run(main)
