"""Prints the maximum relative difference of every parity case, live (where
the framework is installed) and against the recorded trajectories:

    python tests/data/parity_report.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from test_parity import _golden  # noqa: E402

from parity_cases import CASES  # noqa: E402
from trajectories import max_relative_difference, run_optax  # noqa: E402


def main() -> None:
  print("| case | framework | live | recorded |")
  print("|---|---|---|---|")
  for case in CASES:
    grads, params, recorded = _golden(case.name)
    ours = run_optax(case.ours(), grads, params)
    live = "not installed"
    if case.framework == "optax" or importlib.util.find_spec(case.framework):
      expected = case.run_framework(grads, params, **case.framework_options)
      live = f"{max_relative_difference(ours, expected):.1e}"
    print(f"| `{case.name}` | {case.framework} | {live} | "
          f"{max_relative_difference(ours, recorded):.1e} |")


if __name__ == "__main__":
  main()
