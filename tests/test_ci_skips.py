"""In CI a test skipped because something it needs is missing fails the run
(tests/conftest.py); elsewhere it stays a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = '''
import pytest

missing = pytest.importorskip("a_module_that_is_not_installed")


def test_needs_it():
  assert missing
'''

IN_TEST = '''
import pytest


def test_kernel():
  pytest.skip("the CPU kernel was not built")


def test_other_reason():
  pytest.skip("only on TPUs")
'''


def _run(tmp_path: Path, source: str, ci: bool) -> subprocess.CompletedProcess[str]:
  shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
  (tmp_path / "test_case.py").write_text(source)
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci:
    env["CI"] = "true"
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
       "-o", "addopts=", "-q", "-rA", str(tmp_path)],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
  )


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_a_missing_import_fails_in_ci_and_skips_elsewhere(tmp_path, ci):
  result = _run(tmp_path, CASES, ci)
  if ci:
    assert result.returncode != 0, result.stdout
    assert "skipped in CI for something missing" in result.stdout
  else:
    # 5: nothing ran, the module was skipped whole.
    assert result.returncode == 5, result.stdout
    assert "1 skipped" in result.stdout


def test_only_skips_for_something_missing_fail_in_ci(tmp_path):
  result = _run(tmp_path, IN_TEST, ci=True)
  assert "1 failed, 1 skipped" in result.stdout, result.stdout
  assert "the CPU kernel was not built" in result.stdout
