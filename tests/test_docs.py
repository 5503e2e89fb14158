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
from typing import Any

import pytest

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


# The public names whose docstring example is still to be written, each an
# expected failure that turns into an error once the example is there.
PENDING_EXAMPLES: set[str] = set()
MODULES = ("optax_amsgrad", "optax_amsgrad.checkpoint", "optax_amsgrad.problems",
           "optax_amsgrad.interop")


def _public_names() -> list[str]:
  sys.path.insert(0, str(ROOT / "docs" / "_ext"))
  try:
    from api_coverage import public_names
  finally:
    sys.path.pop(0)
  return [f"{module}.{name}" for module in MODULES for name in public_names(module)]


def _api_entry(name: str) -> str:
  """The text of ``name``'s entry in docs/api/: from its directive to the next one."""
  module, short = name.rsplit(".", 1)
  page = "optax_amsgrad" if module == "optax_amsgrad" else module.removeprefix("optax_amsgrad.")
  text = (ROOT / "docs" / "api" / f"{page}.rst").read_text()
  directive = r"^\.\. (?:py:data|autodata|py:function)::\s+"
  match = re.search(rf"{directive}{re.escape(short)}\b.*?(?=^\.\. |\Z)", text, re.S | re.M)
  return match.group(0) if match else ""


def _function_or_class(name: str) -> Any:
  """The object ``name`` names if it is a function or class, else None (an alias, a constant)."""
  import importlib
  import inspect

  module, short = name.rsplit(".", 1)
  obj = getattr(importlib.import_module(module), short)
  return obj if (inspect.isfunction(obj) or inspect.isclass(obj)) and (
      obj.__module__.startswith("optax_amsgrad")) else None


def _example_params() -> list[Any]:
  params = []
  for name in _public_names():
    obj = _function_or_class(name)
    # A re-export (optax_amsgrad.from_torch) is checked where it is defined.
    if obj is not None and obj.__module__ in MODULES and obj.__module__ != name.rsplit(".", 1)[0]:
      continue
    marks = ([pytest.mark.xfail(strict=True, reason="example pending")]
             if name in PENDING_EXAMPLES else [])
    params.append(pytest.param(name, marks=marks))
  return params


@pytest.mark.parametrize("name", _example_params())
def test_every_public_name_has_an_example(name):
  """A function or class has one in its docstring, a type alias or constant in
  its API entry (it has no docstring of its own); re-exports count once, where
  they are defined."""
  obj = _function_or_class(name)
  if obj is not None:
    assert ">>>" in (obj.__doc__ or ""), f"{name} has no example in its docstring"
  else:
    assert ">>>" in _api_entry(name), f"{name} has no example in docs/api/"


def test_api_pages_examples():
  """The examples written in the API pages (type aliases, ``__version__``) run."""
  pages = sorted((ROOT / "docs" / "api").glob("*.rst"))
  code = f"""
import doctest, sys
failed = attempted = 0
for page in {[str(page) for page in pages]!r}:
  result = doctest.testfile(page, module_relative=False,
                            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  failed += result.failed
  attempted += result.attempted
print(f"attempted={{attempted}} failed={{failed}}")
sys.exit(1 if failed or attempted == 0 else 0)
"""
  result = _run_python(code)
  assert result.returncode == 0, result.stdout + result.stderr
  assert int(re.search(r"attempted=(\d+)", result.stdout).group(1)) >= 10


def test_readme_is_a_front_page_whose_links_resolve():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
  local = [link for link in links if "://" not in link]
  assert len(local) >= 15, local
  missing = [link for link in local if not (ROOT / link).exists()]
  assert not missing, missing


def test_install_lines_agree_with_ci():
  """The README's test command and .ci/run install the same extras."""
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  command = re.search(r"python -m pip install -e \"(\.\[[\w,]+\])\" && python -m pytest", readme)
  assert command, "no test command in the README"
  assert f'python -m pip install -e "{command.group(1)}"' in ci


def test_version_has_one_source():
  import importlib.metadata

  import optax_amsgrad

  pyproject = (ROOT / "pyproject.toml").read_text()
  versions = re.findall(r'^version = "([^"]+)"$', pyproject, re.M)
  assert len(versions) == 1, versions
  assert optax_amsgrad.__version__ == importlib.metadata.version("optax-amsgrad") == versions[0]
  for path in ("optax_amsgrad/__init__.py", "CITATION.cff", "docs/conf.py"):
    assert f'"{versions[0]}"' not in (ROOT / path).read_text(), path
  assert "\nversion:" not in (ROOT / "CITATION.cff").read_text()
