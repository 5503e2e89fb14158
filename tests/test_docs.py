"""The documentation's examples run: every docstring example in the package
(as doctests) and the README's quick start.

They run in a subprocess because the test session enables float64, and the
examples show what a user sees by default (float32).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  return subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, env=env,
      cwd=ROOT, timeout=300,
  )


def test_docstring_examples():
  code = """
import doctest, importlib, pkgutil, sys
import optax_amsgrad
failed = attempted = 0
for info in pkgutil.walk_packages(optax_amsgrad.__path__, "optax_amsgrad."):
  if info.name.endswith("__main__") or info.name.endswith("._amsgrad_cpu"):
    continue
  module = importlib.import_module(info.name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  failed += result.failed
  attempted += result.attempted
print(f"attempted={attempted} failed={failed}")
sys.exit(1 if failed or attempted == 0 else 0)
"""
  result = _run_python(code)
  assert result.returncode == 0, result.stdout + result.stderr
  attempted = int(re.search(r"attempted=(\d+)", result.stdout).group(1))
  assert attempted >= 10


def test_readme_quick_start():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  # Run the step the quick start defines, so that it is exercised, not just parsed.
  code += """
x = jnp.ones((8, 3)); y = jnp.full((8,), 2.0)
for _ in range(300):
    params, state = step(params, state, x, y)
assert float(loss(params, x, y)) < 1e-3, float(loss(params, x, y))
print("ok")
"""
  result = _run_python(code)
  assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
