"""Parity with PyTorch, Keras and Optax on 1,000-step gradient sequences.

Live tests run the frameworks where they are installed; the golden tests
replay trajectories recorded by tests/data/record_golden.py, so parity is
checked everywhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from parity_cases import CASES
from trajectories import max_relative_difference, run_optax

GOLDEN = Path(__file__).parent / "data" / "golden.npz"
TOLERANCE = 1e-10


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def _golden(name: str):
  data = np.load(GOLDEN)
  keys = sorted({k.split("/")[2] for k in data.files if k.startswith(f"{name}/params/")})
  params = {k: data[f"{name}/params/{k}"] for k in keys}
  steps = data[f"{name}/grads/{keys[0]}"].shape[0]
  grads = [{k: data[f"{name}/grads/{k}"][i] for k in keys} for i in range(steps)]
  trajectory = [{k: data[f"{name}/trajectory/{k}"][i] for k in keys} for i in range(steps)]
  return grads, params, trajectory


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_trajectory(case):
  grads, params, expected = _golden(case.name)
  assert len(grads) >= 1000
  actual = run_optax(case.ours(), grads, params)
  assert max_relative_difference(actual, expected) <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_live_framework(case):
  if case.framework != "optax" and not _installed(case.framework):
    pytest.skip(f"{case.framework} is not installed")
  grads, params = case.inputs()
  expected = case.run_framework(grads, params, **case.framework_options)
  actual = run_optax(case.ours(), grads, params)
  assert max_relative_difference(actual, expected) <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_live_torch_code_paths(implementation):
  pytest.importorskip("torch")
  case = next(c for c in CASES if c.name == "torch_adam")
  grads, params = case.inputs()
  expected = case.run_framework(
      grads, params, implementation=implementation, **case.framework_options
  )
  actual = run_optax(case.ours(), grads, params)
  assert max_relative_difference(actual, expected) <= TOLERANCE


def test_parity_is_sensitive_to_the_convention():
  # The tolerance separates conventions: replaying PyTorch's trajectory with
  # the Keras or Optax formula fails it by orders of magnitude.
  import optax_amsgrad

  grads, params, expected = _golden("torch_adam")
  for convention in ("keras", "optax"):
    other = run_optax(optax_amsgrad.amsgrad(1e-2, convention=convention), grads, params)
    assert max_relative_difference(other, expected) > 1e3 * TOLERANCE
