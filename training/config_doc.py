"""The experiment configs as the command line shows them: `train.py --help` lists configs/*.py
and their presets; `train.py --print_config` prints a resolved config, every key with the
comment its declaration carries.

A key's comment is found where the key was first set while `get_config` ran (a config section is
often built in another module under a short local name, `o.name = 'adamw'  # sgd | adam ...`):
the comment lines just above that line, the comment at its end, and the comment-only lines that
continue it below.
"""

import ast
import contextlib
import glob
import importlib.util
import os
import sys
import textwrap
import tokenize

import ml_collections

from data import choices

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
_NOT_EXPERIMENTS = ('__init__.py', 'common.py', 'saved.py')
_ML_COLLECTIONS = os.path.dirname(ml_collections.__file__)


# --- --help --------------------------------------------------------------------------------

def experiments() -> str:
  """One line per configs/*.py experiment: its name, its presets, its docstring's first line.
  Read from the files' source, so --help imports nothing."""
  trees = {os.path.basename(p)[:-3]: ast.parse(open(p, encoding='utf-8').read())
           for p in sorted(glob.glob(os.path.join(CONFIGS, '*.py')))}
  shared = _constant(trees.get('common'), 'PARALLELISM')
  lines = []
  for name, tree in trees.items():
    if f'{name}.py' in _NOT_EXPERIMENTS:
      continue
    presets = ','.join(_presets(tree, trees) + shared)
    lines += [f'  configs/{name}.py[:{presets}]', *textwrap.wrap(
        _first_sentence(ast.get_docstring(tree) or ''), 96, initial_indent=' ' * 6,
        subsequent_indent=' ' * 6)]
  return '\n'.join(lines)


def _first_sentence(docstring: str) -> str:
  paragraph = ' '.join(docstring.split('\n\n')[0].split())
  return paragraph.split('. ')[0].rstrip('.') + '.'


def _constant(tree, name: str) -> list[str]:
  """The strings of the module-level tuple `name` in `tree` ([] if there is none)."""
  for node in getattr(tree, 'body', ()):
    if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == name for t in node.targets):
      return _strings(node.value)
  return []


def _strings(node) -> list[str]:
  if isinstance(node, (ast.Tuple, ast.List)):
    return [e.value for e in node.elts if isinstance(e, ast.Constant)]
  return []


def _presets(tree, trees) -> list[str]:
  """The preset order a config passes to `common.apply_presets`: a tuple, or a name of one in
  this module or another config module."""
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'apply_presets'
        and len(node.args) >= 3):
      order = node.args[2]
      if isinstance(order, ast.Name):
        return _constant(tree, order.id)
      if isinstance(order, ast.Attribute) and isinstance(order.value, ast.Name):
        return _constant(trees.get(order.value.id), order.attr)
      return _strings(order)
  return []


# --- --print_config ------------------------------------------------------------------------

def print_config(config, config_arg: str) -> str:
  """`config` (resolved: presets and overrides applied), one `key = value` line per key, under
  the comments of each key's declaration in the config file `config_arg` ('path[:presets]'), or
  of its registry entry (data/choices.py) for a key that a registered choice declares."""
  from training import config_check  # pylint: disable=g-import-not-at-top; --help stays fast
  path, _, presets = config_arg.partition(':')
  sites = _declaration_sites(path, presets)
  registered = choices.comments(config_check.registries(config))
  lines, shown = [f'# --config={config_arg}'], set()
  for key, value in _leaves(config):
    site = sites.get(key) or next((sites[k] for k in _parents(key) if k in sites), None)
    above, after = _comments(*site) if site else ([], '')
    section = next((k for k in _parents(key) if k in registered), None)
    if key in registered or section:
      site, after = section or key, f'# {registered[key]}' if registered.get(key) else ''
      above = [f'# {registered[section]}'] if section else []
    if site in shown:
      above, after = [], after if section else ''  # a dict's keys share its line: its comments once
    shown.add(site)
    lines += above + [f'{key} = {value!r}' + (f'  {after}' if after else '')]
  return '\n'.join(lines)


def _leaves(config, prefix=''):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value.to_dict() if isinstance(
          value, ml_collections.ConfigDict) else value


def _parents(key: str):
  parts = key.split('.')
  return ['.'.join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _declaration_sites(path: str, presets: str) -> dict[str, tuple[str, int]]:
  """{key: (file, line)} of where `get_config(presets)` of the file at `path` first set it."""
  spec = importlib.util.spec_from_file_location('podium_config_doc', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with _first_assignments() as sites:
    config = module.get_config(presets) if presets else module.get_config()
  found = {}

  def walk(d, prefix):
    for key in d.keys():
      if (id(d), key) in sites:
        found[prefix + key] = sites[(id(d), key)]
      if isinstance(d[key], ml_collections.ConfigDict):
        walk(d[key], f'{prefix}{key}.')

  walk(config, '')
  return found


@contextlib.contextmanager
def _first_assignments():
  """Records {(id(config dict), key): (file, line)} of the first assignment of each key made
  from outside ml_collections while active. The dicts are kept alive so no id is reused."""
  sites, alive = {}, []
  setitem = ml_collections.ConfigDict.__setitem__

  def recording_setitem(self, key, value):
    if (id(self), key) not in sites:
      frame = sys._getframe(1)  # pylint: disable=protected-access
      while frame is not None and (frame.f_code.co_filename.startswith(_ML_COLLECTIONS)
                                   or frame.f_code.co_filename == __file__):
        frame = frame.f_back
      if frame is not None:
        sites[(id(self), key)] = (frame.f_code.co_filename, frame.f_lineno)
        alive.append(self)
    setitem(self, key, value)

  ml_collections.ConfigDict.__setitem__ = recording_setitem
  try:
    yield sites
  finally:
    ml_collections.ConfigDict.__setitem__ = setitem


def _comments(filename: str, line: int) -> tuple[list[str], str]:
  """(the comment lines right above `line`, its end-of-line comment with the comment-only
  lines below that continue it) in `filename`."""
  comments, indents, continuations = _file_comments(filename)
  above, previous = [], line - 1
  while previous in comments and previous not in indents and previous not in continuations:
    above.insert(0, comments[previous][1])
    previous -= 1
  after, following = comments[line][1] if line in comments and line in indents else '', line + 1
  while after and following in continuations:
    after += ' ' + comments[following][1].lstrip('#').strip()
    following += 1
  return above, after


_FILES = {}


def _file_comments(filename: str):
  """({line: (column of its text, its comment)}, {line with code: its indentation}, {comment-only
  line continuing the comment at the end of a line above, its text lined up with that one}) of
  a Python file, tokenized once."""
  if filename not in _FILES:
    comments, indents = {}, {}
    with open(filename, encoding='utf-8') as f:
      for token in tokenize.generate_tokens(f.readline):
        if token.type == tokenize.COMMENT:
          text = token.string.lstrip('#').lstrip()
          comments[token.start[0]] = (token.start[1] + len(token.string) - len(text),
                                      token.string.strip())
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
          for row in range(token.start[0], token.end[0] + 1):
            indents.setdefault(row, token.start[1] if row == token.start[0] else 0)
    continuations = set()
    for line in sorted(comments):
      if line in indents:  # an end-of-line comment
        column, following = comments[line][0], line + 1
        while (following in comments and following not in indents
               and comments[following][0] >= column):
          continuations.add(following)
          following += 1
    _FILES[filename] = comments, indents, continuations
  return _FILES[filename]
