"""An ensemble of AMSGrad optimizers under jax.vmap, each member with its own
learning rate through optax.inject_hyperparams, equals separate runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import max_relative_difference, run_optax

MEMBERS = 16
STEPS = 200
SHAPES = TREE_SHAPES["mixed"]
LEARNING_RATES = np.geomspace(1e-4, 3e-1, MEMBERS)


def member_data(dtype):
  """Each member's own initial params and gradient sequence."""
  params = [initial_params(SHAPES, seed=10 + i, dtype=dtype) for i in range(MEMBERS)]
  grads = [spiky_gradients(SHAPES, STEPS, seed=100 + i, dtype=dtype)
           for i in range(MEMBERS)]
  return params, grads


def injected(convention: str = "pytorch") -> optax.GradientTransformation:
  # Only the learning rate is injected. Injected b1 and b2 would be arrays of
  # the params' dtype, and 1 - b2 would be taken from float32 0.999 rather
  # than from 0.999: a rounding away from plain amsgrad.
  return optax.inject_hyperparams(
      optax_amsgrad.amsgrad, static_args=("b1", "b2", "eps", "eps_root", "seed")
  )(learning_rate=0.0, convention=convention)


def with_learning_rate(state, learning_rate):
  return state._replace(
      hyperparams={**state.hyperparams, "learning_rate": learning_rate}
  )


def run_ensemble(params, grads, convention, dtype):
  """All members at once: one vmapped init, one vmapped update per step."""
  optimizer = injected(convention)

  def init(p, learning_rate):
    return with_learning_rate(optimizer.init(p), learning_rate)

  stack = lambda trees: jax.tree.map(lambda *x: jnp.asarray(np.stack(x), dtype), *trees)
  params = stack(params)
  # grads[member][step][leaf] -> leaf arrays shaped (steps, members, ...)
  grads = {
      k: jnp.asarray(
          np.stack([[grads[m][t][k] for m in range(MEMBERS)] for t in range(STEPS)]),
          dtype,
      )
      for k in SHAPES
  }

  @jax.jit
  def run(params, grads, learning_rates):
    states = jax.vmap(init)(params, learning_rates)

    def step(carry, g):
      params, states = carry
      # Each member's update reads its learning rate from its own state.
      updates, states = jax.vmap(optimizer.update)(g, states, params)
      return (optax.apply_updates(params, updates), states), None

    (params, states), _ = jax.lax.scan(step, (params, states), grads)
    return params, states

  return run(params, grads, jnp.asarray(LEARNING_RATES, dtype))


def max_ulps(actual: np.ndarray, expected: np.ndarray) -> int:
  """Largest distance in units in the last place (same-sign values)."""
  assert actual.dtype == expected.dtype
  as_int = {4: np.int32, 8: np.int64}[actual.dtype.itemsize]
  distance = actual.view(as_int).astype(object) - expected.view(as_int).astype(object)
  assert np.all(np.sign(actual) == np.sign(expected))
  return int(np.max(np.abs(distance), initial=0))


def separate_runs(params, grads, convention, dtype):
  """Each member on its own, one after the other (one compiled run, fed each
  member's learning rate through its state)."""
  optimizer = injected(convention)

  @jax.jit
  def run(params, grads, learning_rate):
    state = with_learning_rate(optimizer.init(params), learning_rate)

    def step(carry, g):
      params, state = carry
      updates, state = optimizer.update(g, state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, state), grads)[0][0]

  finals = []
  for member in range(MEMBERS):
    stacked = {
        k: jnp.asarray(np.stack([g[k] for g in grads[member]]), dtype) for k in SHAPES
    }
    start = {k: jnp.asarray(v, dtype) for k, v in params[member].items()}
    rate = jnp.asarray(LEARNING_RATES[member], dtype)
    finals.append(jax.tree.map(np.asarray, run(start, stacked, rate)))
  return finals


@pytest.mark.parametrize("convention", ["pytorch", "optax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vmapped_ensemble_equals_separate_runs(convention, dtype):
  params, grads = member_data(dtype)
  ensemble, states = run_ensemble(params, grads, convention, dtype)
  np.testing.assert_array_equal(
      states.hyperparams["learning_rate"], LEARNING_RATES.astype(dtype)
  )
  worst = 0
  for member, alone in enumerate(separate_runs(params, grads, convention, dtype)):
    for k in SHAPES:
      worst = max(worst, max_ulps(np.asarray(ensemble[k][member]), alone[k]))
  # XLA compiles the batched step differently (vectorised, fused), so a few
  # elements may differ in their last bits after 200 steps; nothing more.
  assert worst <= 64


def test_injected_learning_rate_is_bit_identical():
  # Without vmap, injecting the learning rate changes no bit: the separate
  # runs above are plain amsgrad runs.
  params, grads = member_data(np.float32)
  finals = separate_runs(params, grads, "pytorch", np.float32)
  for member in (0, MEMBERS - 1):
    plain = optax_amsgrad.amsgrad(float(LEARNING_RATES[member]))
    alone = run_optax(plain, grads[member], params[member], dtype=np.float32)[-1]
    for k in SHAPES:
      np.testing.assert_array_equal(finals[member][k], alone[k])


def test_vmapped_ensemble_matches_reference():
  params, grads = member_data(np.float64)
  ensemble, _ = run_ensemble(params, grads, "pytorch", np.float64)
  for member in range(MEMBERS):
    expected = run_reference(
        grads[member], params[member], learning_rate=float(LEARNING_RATES[member])
    )[-1]
    actual = {k: np.asarray(ensemble[k][member]) for k in SHAPES}
    assert max_relative_difference([actual], [expected]) < 1e-12, member
  # Different learning rates give different members.
  assert not np.allclose(ensemble["kernel"][0], ensemble["kernel"][-1])
