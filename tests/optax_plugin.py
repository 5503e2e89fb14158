"""A pytest plugin that runs Optax's own test modules against
``optax_amsgrad.amsgrad``: ``optax.amsgrad`` is replaced before the modules
are imported, and only the tests of amsgrad are kept.

  python -m pytest -p optax_plugin --pyargs optax._src.alias_test optax._src.sharding_test

with this folder on ``PYTHONPATH`` (tests/test_optax_citizen.py does this).
"""

from __future__ import annotations

from typing import Any

import optax
from optax._src import alias

import optax_amsgrad

optax.amsgrad = optax_amsgrad.amsgrad
alias.amsgrad = optax_amsgrad.amsgrad


def _tests_amsgrad(item: Any) -> bool:
  # alias_test names its cases by number and records their parameters;
  # sharding_test puts the optimizer's name in the test's name.
  parameters = getattr(getattr(item, "obj", None), "__x_params_repr__", "")
  return "amsgrad" in item.name or "'amsgrad'" in parameters


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
  kept = [item for item in items if _tests_amsgrad(item)]
  config.hook.pytest_deselected(items=[item for item in items if item not in kept])
  items[:] = kept
