"""Choices made by name in a config, e.g. `optim.schedule = 'cosine'`.

A `Registry` holds one entry per name. An entry declares the keys it reads (each with its
default and a one-line comment), checks their values and builds its object. The config section
(`declare`), the error for an unknown name or for a changed key that the chosen entry does not
read (`check`), the entry's own checks (`validate`), the keys a resolved config keeps
(`keep_chosen`) and the names and comments users read (`--print_config`, the README) all come
from the registry, so a new choice is one `register` call in one file. It lives in data/, the
lowest layer with a choice (data sources).
"""

import dataclasses
from typing import Any, Callable

import ml_collections

REGISTRIES = []  # every registry made, in order: config_doc reads their comments


@dataclasses.dataclass(frozen=True)
class Key:
  """A key an entry reads, with its default and what it means (one line)."""
  default: Any
  comment: str = ''


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  doc: str  # one line
  keys: dict  # key -> Key
  build: Callable
  check: Callable  # (section, **context) -> None, or ValueError('<key in section>: ...')


def require(ok: bool, key: str, message: str):
  """The error an entry's check raises: `key` as it is written in the registry's section."""
  if not ok:
    raise ValueError(f'{key}: {message}')


class Registry:
  """The entries of one choice. `path` names the choosing key ('optim.schedule'); the entries'
  keys are in its section ('optim.final_lr_fraction'), or, with `own_sections`, in a section
  per entry named after it ('optim.sgd.momentum'). Entries may share a key if they declare it
  alike."""

  def __init__(self, path: str, doc: str, own_sections: bool = False):
    self.section, _, self.key = path.rpartition('.')
    self.path, self.doc, self.own_sections = path, doc, own_sections
    self.entries: dict[str, Entry] = {}
    REGISTRIES.append(self)

  def register(self, name: str, doc: str, check: Callable = lambda section, **_: None, /,
               **keys):
    """Decorates the entry's build function; `keys`: name -> Key, or a plain default (any
    name, `name` and `doc` included: the first three are positional)."""
    keys = {k: v if isinstance(v, Key) else Key(v) for k, v in keys.items()}
    for key, declared in keys.items():
      other = self._declared().get(key)
      if not self.own_sections and other and other[0] != declared:
        raise ValueError(f'{self.path}={name!r} declares {key} unlike {", ".join(other[1])}')

    def add(build):
      self.entries[name] = Entry(name, doc, keys, build, check)
      return build
    return add

  def __getitem__(self, name: str) -> Entry:
    return self.entries[name]

  def chosen(self, section) -> Entry:
    """The entry `section` names; a ValueError naming the choosing key for an unknown name."""
    name = section[self.key]
    require(name in self.entries, self.path, f'{name!r} is not one of {", ".join(self)}')
    return self.entries[name]

  def __iter__(self):
    return iter(self.entries)

  def __contains__(self, name) -> bool:
    return name in self.entries

  def _declared(self) -> dict[str, tuple[Key, list[str]]]:
    """Each key of the section the entries read -> (its Key, the entries that read it)."""
    declared = {}
    for entry in self.entries.values():
      for key, value in ({entry.name: None} if self.own_sections else entry.keys).items():
        declared.setdefault(key, (value, []))[1].append(entry.name)
    return declared

  def _read(self, name: str) -> set[str]:
    return {name} if self.own_sections else set(self.entries[name].keys)

  def defaults(self) -> dict:
    """Every entry's keys at their defaults (a dict per entry with `own_sections`)."""
    return {key: ({k: v.default for k, v in self.entries[key].keys.items()}
                  if self.own_sections else value.default)
            for key, (value, _) in self._declared().items()}

  def declare(self, section, default: str):
    """Sets the choosing key to `default`, then every entry's keys at their defaults."""
    section[self.key] = default
    for key, value in self.defaults().items():
      section[key] = value

  def comments(self) -> dict[str, str]:
    """Each key's path -> its comment: the names for the choosing key; each entry's doc and
    keys' comments, a shared key's prefixed with the entries that read it."""
    comments = {self.path: f'{self.doc}: {" | ".join(self)}'}
    for key, (value, readers) in self._declared().items():
      if self.own_sections:
        entry = self.entries[key]
        comments.update({f'{self.section}.{key}.{k}': v.comment for k, v in entry.keys.items()})
        comments[f'{self.section}.{key}'] = f'{key}: {entry.doc}'
      elif value.comment:
        comments[f'{self.section}.{key}'] = f'{", ".join(readers)}: {value.comment}'
    return comments

  def check(self, section, overridden=()):
    """The chosen name, then the keys only other entries read, which must keep their defaults.
    `overridden`: the keys ('optim.sgd.momentum') set on the command line. A config file tunes
    the keys of its own choice: switching the choice on the command line leaves those behind,
    and only then are they tolerated; set there, never."""
    name = self.chosen(section).name
    switched, defaults = self.path in overridden, self.defaults()
    for key in self._unread(section, name):
      for leaf, value, default in _leaves(section[key], defaults[key], key):
        path = f'{self.section}.{leaf}'
        require(path not in overridden and (value == default or switched), path,
                f'set to {value!r}, but {self.path}={name!r} does not read it')

  def validate(self, section, **context):
    """The chosen entry's own check of its keys, given `context` (e.g. other sections' values)."""
    entry = self.chosen(section)
    try:
      entry.check(section, **context)
    except ValueError as e:
      raise ValueError(f'{self.section}.{e}') from None

  def _unread(self, section, name: str) -> list[str]:
    return [k for k in self._declared() if k in section and k not in self._read(name)]

  def keep_chosen(self, section):
    """`section` without the keys that only entries not chosen read, locked."""
    unread = self._unread(section, section[self.key])
    kept = ml_collections.ConfigDict({k: section[k] for k in section.keys() if k not in unread})
    kept.lock()
    return kept


def _leaves(value, default, key):
  """(key, value, default) for each plain value under `key` (sections are ConfigDicts)."""
  if hasattr(value, 'items'):
    for k, v in value.items():
      yield from _leaves(v, default[k], f'{key}.{k}')
  else:
    yield key, value, default


def comments(registries=None) -> dict[str, str]:
  """The comment of each key that `registries` (default: every registry) declare, by its path.
  Two registries may declare one path (each task's data.source): pass those of one config."""
  chosen = REGISTRIES if registries is None else registries
  return {path: comment for r in chosen for path, comment in r.comments().items()}
