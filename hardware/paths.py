"""Paths as users type them: relative, `~`, `./x`, symlinked, or a bucket URL.

Orbax and TensorStore need absolute local paths, and a tool run from another folder must mean the
folder the user meant, so every entry point resolves its path flags once, here.
"""

import os


def absolute(path: str) -> str:
  """A local path made absolute (`~` expanded, symlinks kept); URLs (gs://...) and '' unchanged."""
  if not path or '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))
