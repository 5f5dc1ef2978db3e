"""The code passes ruff with the rules in pyproject.toml ([tool.ruff]), as CI checks."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
  if importlib.util.find_spec('ruff') is None:
    pytest.skip("ruff is missing: pip install -e '.[test]' installs it")
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache',
                           '--output-format=concise', '.'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
