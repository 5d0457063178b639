"""The code follows the project's one formatter and linter (ruff, configured in pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
  local = pathlib.Path(sys.executable).with_name("ruff")
  if local.exists():
    return [str(local)]
  if shutil.which("ruff"):
    return ["ruff"]
  pytest.skip("ruff is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
  result = subprocess.run(_ruff() + command + ["."], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
