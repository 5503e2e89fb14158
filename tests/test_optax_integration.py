"""AMSGrad inside Optax's wrappers: each composition against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import ReferenceAmsgrad, run_reference
from trajectories import max_relative_difference, run_optax

SHAPES = TREE_SHAPES["mixed"]


def test_chain_with_clipping():
  grads = spiky_gradients(SHAPES, 300, seed=31)
  params = initial_params(SHAPES)
  clipped = [{k: np.clip(v, -1.0, 1.0) for k, v in g.items()} for g in grads]
  expected = run_reference(clipped, params, learning_rate=1e-2)
  solver = optax.chain(optax.clip(1.0), optax_amsgrad.amsgrad(1e-2))
  assert max_relative_difference(run_optax(solver, grads, params), expected) < 1e-12


def test_inject_hyperparams_changes_take_effect():
  grads = spiky_gradients(SHAPES, 200, seed=32)
  params = initial_params(SHAPES)
  solver = optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6
  )
  expected = run_reference(grads, params, learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6)
  assert max_relative_difference(run_optax(solver, grads, params), expected) < 1e-12
  # A hyperparameter set in the state between steps is used by the next step.
  state = solver.init(jnp.zeros(3))
  state.hyperparams["b2"] = jnp.asarray(0.5)
  _, state = solver.update(jnp.ones(3), state)
  np.testing.assert_allclose(np.asarray(state.inner_state[0].nu), 0.5)


def test_multi_steps_accumulates_then_steps():
  rng = np.random.default_rng(33)
  micro = [rng.normal(size=4) for _ in range(12)]
  solver = optax.MultiSteps(optax_amsgrad.amsgrad(1e-2), every_k_schedule=3)
  params = jnp.zeros(4)
  state = solver.init(params)
  reference = ReferenceAmsgrad((4,))
  expected = np.zeros(4)
  for k, g in enumerate(micro):
    updates, state = solver.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    if k % 3 == 2:
      expected = expected - 1e-2 * reference.step(np.mean(micro[k - 2 : k + 1], axis=0))
    # MultiSteps keeps its running mean of gradients in float32.
    np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("masked_out", ["masked_node", "none"])
def test_masked(masked_out):
  params = {"w": jnp.ones(3), "frozen": jnp.ones(2)}
  grads = {"w": jnp.array([1.0, -2.0, 3.0]), "frozen": jnp.ones(2)}
  mask = {"w": True, "frozen": False}
  if masked_out == "masked_node":
    solver = optax.masked(optax_amsgrad.amsgrad(0.1), mask)
    updates, _ = solver.update(grads, solver.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["frozen"]), grads["frozen"])
  else:
    solver = optax_amsgrad.amsgrad(0.1)
    params = {"w": jnp.ones(3), "frozen": None}
    grads = {"w": grads["w"], "frozen": None}
    updates, _ = solver.update(grads, solver.init(params), params)
    assert updates["frozen"] is None
  expected = -0.1 * ReferenceAmsgrad((3,)).step(np.asarray(grads["w"]))
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-12)


def test_apply_if_finite_skips_bad_steps():
  solver = optax.apply_if_finite(optax_amsgrad.amsgrad(1e-2), max_consecutive_errors=3)
  reference = ReferenceAmsgrad((3,))
  params = jnp.zeros(3)
  expected = np.zeros(3)
  state = solver.init(params)
  rng = np.random.default_rng(34)
  for k in range(20):
    g = rng.normal(size=3)
    if k in (4, 11):
      g[1] = np.nan if k == 4 else np.inf
    else:
      expected = expected - 1e-2 * reference.step(g)
    updates, state = solver.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-12)
  assert int(state.total_notfinite) == 2


def test_jit_with_donated_state():
  solver = optax_amsgrad.amsgrad(1e-2)

  @jax.jit
  def step(params, state, grads):
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
  params = jnp.ones(16)
  state = solver.init(params)
  grads = jnp.linspace(-1, 1, 16)
  expected, _ = step(params, state, grads)
  actual, _ = donated(jnp.ones(16), solver.init(jnp.ones(16)), grads)
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


@pytest.mark.parametrize(
    ("dtype", "state_dtype", "rtol"),
    [
        (jnp.float32, None, 1e-5),
        (jnp.float64, None, 1e-12),
        (jnp.complex64, None, 1e-5),
        (jnp.bfloat16, jnp.float32, 1e-2),  # bfloat16 output: 8 mantissa bits
        # The update is computed from the stored float32 moments: float32's
        # round-off, not float64's.
        (jnp.float64, jnp.float32, 1e-6),
    ],
)
def test_parameter_dtypes(dtype, state_dtype, rtol):
  solver = optax_amsgrad.amsgrad(1e-2, mu_dtype=state_dtype, nu_dtype=state_dtype)
  is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
  rng = np.random.default_rng(35)
  g = rng.normal(size=6) + (1j * rng.normal(size=6) if is_complex else 0)
  updates, _ = solver.update(jnp.asarray(g, dtype), solver.init(jnp.zeros(6, dtype)))
  assert updates.dtype == dtype
  rounded = np.asarray(jnp.asarray(g, dtype).astype(jnp.complex128 if is_complex else jnp.float64))
  expected = -1e-2 * ReferenceAmsgrad((6,), complex_params=is_complex).step(rounded)
  np.testing.assert_allclose(
      np.asarray(updates.astype(jnp.complex128 if is_complex else jnp.float64)),
      expected,
      rtol=rtol,
  )
