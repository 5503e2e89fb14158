"""amsgrad and amsgradw against the float64 NumPy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import max_relative_difference, run_optax

pytestmark = pytest.mark.both_modes

SHAPES = TREE_SHAPES["mixed"]


@pytest.mark.parametrize("convention", ["pytorch", "keras", "optax", "paper"])
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_amsgrad_with_schedule(convention):
  grads = spiky_gradients(SHAPES, 500, seed=21)
  params = initial_params(SHAPES)
  schedule = lambda count: 1e-2 / jnp.sqrt(1.0 + count.astype(jnp.float64))
  expected = run_reference(
      grads,
      params,
      learning_rate=lambda step: 1e-2 / np.sqrt(1.0 + step),
      convention=convention,
  )
  actual = run_optax(optax_amsgrad.amsgrad(schedule, convention=convention), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_amsgradw_is_decoupled_weight_decay():
  grads = spiky_gradients(SHAPES, 500, seed=22)
  params = initial_params(SHAPES)
  expected = run_reference(grads, params, learning_rate=1e-2, weight_decay=0.1)
  actual = run_optax(optax_amsgrad.amsgradw(1e-2, weight_decay=0.1), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_coupled_weight_decay_recipe():
  grads = spiky_gradients(SHAPES, 500, seed=23)
  params = initial_params(SHAPES)
  expected = run_reference(grads, params, learning_rate=1e-2, coupled_weight_decay=0.1)
  solver = optax.chain(optax.add_decayed_weights(0.1), optax_amsgrad.amsgrad(1e-2))
  actual = run_optax(solver, grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


def test_amsgradw_mask_excludes_leaves():
  params = {"kernel": jnp.ones(3), "bias": jnp.ones(3)}
  zero = {"kernel": jnp.zeros(3), "bias": jnp.zeros(3)}
  solver = optax_amsgrad.amsgradw(
      0.1, weight_decay=0.5, mask={"kernel": True, "bias": False}
  )
  updates, _ = solver.update(zero, solver.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.05)
  np.testing.assert_array_equal(np.asarray(updates["bias"]), 0.0)


def test_amsgradw_rejects_negative_weight_decay():
  with pytest.raises(ValueError, match="weight_decay"):
    optax_amsgrad.amsgradw(0.1, weight_decay=-1.0)
