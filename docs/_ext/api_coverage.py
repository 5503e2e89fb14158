"""Fails the build when a public name has no entry in the API reference.

The public names of a module are its ``__all__`` (type aliases and
``__version__`` included) or, for a module without one, the names its source
defines at the top level (functions, classes and assignments) that do not
start with an underscore. Each must be documented under its full name
(``optax_amsgrad.interop.from_torch``) by an autodoc or ``py:`` directive.
The modules checked are ``api_coverage_modules`` in ``conf.py``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_names(module_name: str) -> list[str]:
  """The public names of a module: its ``__all__``, else what its source defines."""
  module = importlib.import_module(module_name)
  names = getattr(module, "__all__", None)
  if names is not None:
    return list(names)
  tree = ast.parse(inspect.getsource(module))
  found: list[str] = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      found.append(node.name)
    elif isinstance(node, ast.Assign):
      found += [target.id for target in node.targets if isinstance(target, ast.Name)]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      found.append(node.target.id)
  return [name for name in dict.fromkeys(found) if not name.startswith("_")]


def missing_entries(modules: list[str], documented: set[str]) -> list[str]:
  """The full names of the public names that have no entry."""
  return [f"{module}.{name}" for module in modules for name in public_names(module)
          if f"{module}.{name}" not in documented]


def check(app: Sphinx, env: BuildEnvironment) -> None:
  documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
  missing = missing_entries(app.config.api_coverage_modules, documented)
  for name in missing:
    logger.warning("%s is public but has no entry in the API reference (docs/api/): "
                   "add an autodoc directive for it", name, type="api_coverage")
  env.api_coverage_missing = missing  # type: ignore[attr-defined]


def fail_if_missing(app: Sphinx, exception: Exception | None) -> None:
  # A warning fails a build run with -W; this fails it without -W too.
  if exception is None and getattr(app.env, "api_coverage_missing", None):
    app.statuscode = 1


def setup(app: Sphinx) -> dict[str, Any]:
  app.add_config_value("api_coverage_modules", [], "env", types=[list])
  app.connect("env-check-consistency", check)
  app.connect("build-finished", fail_if_missing)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
