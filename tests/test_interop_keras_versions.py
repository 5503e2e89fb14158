"""The Keras interop tests against the lowest Keras of the supported range.

``optax_amsgrad.interop`` reads private attributes of Keras' optimizers, so
its support ends where its tests do: ``interop.KERAS_TESTED`` (the bound of
``keras`` in pyproject.toml). The installed Keras, which pip keeps in that
range, runs the tests in the ordinary session: the highest end. This test
installs the lowest into a temporary directory, put in front of the
environment's packages (which provide Keras' own dependencies), and runs the
same tests there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optax_amsgrad import interop

ROOT = Path(__file__).resolve().parents[1]
KERAS_TESTS = ["tests/test_interop.py", "tests/test_interop_checks.py"]


def lowest_supported_keras() -> str:
  from packaging.specifiers import SpecifierSet

  (lowest,) = [s.version for s in SpecifierSet(interop.KERAS_TESTED) if s.operator == ">="]
  return lowest


@pytest.mark.slow
@pytest.mark.parity
def test_keras_interop_on_the_lowest_supported_keras(tmp_path):
  pytest.importorskip("keras")
  version = lowest_supported_keras()
  target = tmp_path / "keras"
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
       f"keras=={version}"],
      capture_output=True, text=True, timeout=300,
  )
  assert install.returncode == 0, f"pip could not install keras=={version}:\n{install.stderr}"
  env = {**os.environ, "KERAS_BACKEND": "jax",
         "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}
  found = subprocess.run(
      [sys.executable, "-c", "import keras; print(keras.__version__, keras.__file__)"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
  )
  assert found.returncode == 0, found.stderr
  installed, path = found.stdout.split()
  assert Path(installed).parts and installed.startswith(version), found.stdout
  assert Path(path).is_relative_to(target), found.stdout
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "keras",
       *KERAS_TESTS],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
  )
  print(f"\nkeras {installed}:\n{run.stdout[-2000:]}")
  assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
  # The Keras tests ran there, none skipped.
  assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
