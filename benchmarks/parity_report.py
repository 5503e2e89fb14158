"""The parity table: the maximum relative difference of every parity case of
``tests/test_parity.py``, live (where the framework is installed) and against
the recorded trajectories, stored for ``render.py``:

    python benchmarks/parity_report.py    # writes benchmarks/results/parity.json

Each case runs 1,000 float64 steps (16 parameters in three leaves, Gaussian
gradients with rare 100x spikes) in the framework and in optax_amsgrad, and
takes the largest relative difference over all steps and parameters.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from machine import command_line, load_average, provenance  # noqa: E402
from test_parity import _golden  # noqa: E402

from parity_cases import CASES  # noqa: E402
from trajectories import max_relative_difference, run_optax  # noqa: E402


def measure() -> list[dict[str, object]]:
  cases = []
  for case in CASES:
    grads, params, recorded = _golden(case.name)
    ours = run_optax(case.ours(), grads, params)
    live = None
    if case.framework == "optax" or importlib.util.find_spec(case.framework):
      expected = case.run_framework(grads, params, **case.framework_options)
      live = max_relative_difference(ours, expected)
    cases.append({
        "name": case.name, "framework": case.framework,
        "framework_options": {k: repr(v) for k, v in case.framework_options.items()},
        "live": live, "recorded": max_relative_difference(ours, recorded),
    })
  return cases


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, default=HERE / "results" / "parity.json")
  args = parser.parse_args(argv)
  meta = provenance(command_line("parity_report.py", argv),
                    packages=("jax", "jaxlib", "optax", "torch", "keras"))
  cases = measure()
  meta["machine"]["load_average_end"] = load_average()
  args.out.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")
  for case in cases:
    live = "not installed" if case["live"] is None else f"{case['live']:.1e}"
    print(f"{case['name']:28s} {case['framework']:6s} live {live:>13s} "
          f"recorded {case['recorded']:.1e}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
