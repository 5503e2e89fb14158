"""Records the frameworks' AMSGrad trajectories into tests/data/golden.npz.

Run from the repository root with torch==2.13.0 and keras installed:

    python tests/data/record_golden.py

The gradients, initial params and each framework's params after every step
are stored, with the framework versions, so that tests/test_parity.py checks
parity also where the frameworks are not installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from parity_cases import CASES  # noqa: E402


def main() -> None:
  import keras
  import optax
  import torch

  arrays: dict[str, np.ndarray] = {}
  for case in CASES:
    grads, params = case.inputs()
    trajectory = case.run_framework(grads, params, **case.framework_options)
    for key in params:
      arrays[f"{case.name}/grads/{key}"] = np.stack([g[key] for g in grads])
      arrays[f"{case.name}/params/{key}"] = params[key]
      arrays[f"{case.name}/trajectory/{key}"] = np.stack([p[key] for p in trajectory])
    print(f"recorded {case.name}")
  versions = {"torch": torch.__version__, "keras": keras.__version__,
              "optax": optax.__version__, "jax": jax.__version__}
  arrays["versions"] = np.array(json.dumps(versions))
  np.savez_compressed(HERE / "golden.npz", **arrays)
  print(f"wrote {HERE / 'golden.npz'} with {versions}")


if __name__ == "__main__":
  main()
