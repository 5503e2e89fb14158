"""Non-finite gradients, extreme magnitudes, narrow dtypes, the step counter
at its limit and long runs, each against the float64 NumPy reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import ReferenceAmsgrad, run_reference
from trajectories import max_relative_difference, run_optax

CONVENTIONS = ["pytorch", "keras", "optax", "paper"]
INT32_MAX = 2**31 - 1

# A float32 run against exact arithmetic: the updates are O(1), and float32
# round-off through the moments and the bias corrections stays below this.
FLOAT32_UPDATE_ATOL = 2e-5


# ----------------------------------------------------------------------------
# Non-finite gradients.
# ----------------------------------------------------------------------------


def test_nan_gradient_without_protection_is_loud_not_silent():
  # max(nu_max, NaN) is NaN: without optax.apply_if_finite one NaN gradient
  # ruins that coordinate for good. It shows at once as a NaN update (never a
  # silently frozen or slightly wrong coordinate); the other coordinates go on
  # exactly.
  solver = optax_amsgrad.scale_by_amsgrad()
  reference = ReferenceAmsgrad((2,))
  state = solver.init(jnp.zeros(3))
  rng = np.random.default_rng(0)
  for k in range(6):
    g = rng.normal(size=3)
    if k == 2:
      g[0] = np.nan
    updates, state = solver.update(jnp.asarray(g), state)
    np.testing.assert_allclose(updates[1:], reference.step(g[1:]), rtol=1e-12)
    assert bool(jnp.isnan(updates[0])) == (k >= 2)
  assert bool(jnp.isnan(state.nu_max[0]))


def _inject(grads, steps, rng):
  """Copies ``grads`` with NaN / +inf / -inf in one random leaf entry of each
  step in ``steps``."""
  bad = [{k: v.copy() for k, v in g.items()} for g in grads]
  for i, step in enumerate(steps):
    leaf = sorted(bad[step])[i % len(bad[step])]
    flat = bad[step][leaf].reshape(-1)
    flat[rng.integers(flat.size)] = (np.nan, np.inf, -np.inf)[i % 3]
  return bad


@pytest.mark.parametrize(
    ("learning_rate", "weight_decay"),
    [
        (1e-2, None),
        (optax.cosine_decay_schedule(1e-2, 300), None),
        (1e-2, 0.1),
    ],
    ids=["amsgrad", "schedule", "amsgradw"],
)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_apply_if_finite_recovers_exactly(learning_rate, weight_decay, convention):
  # The recipe: a run with NaN / inf gradients injected (some steps in a row)
  # equals, step for step, the run on the same sequence without those steps,
  # and both match the reference. Skipped steps leave the whole inner state,
  # the step count included, untouched, so schedules do not advance either.
  def make() -> optax.GradientTransformation:
    if weight_decay is None:
      return optax_amsgrad.amsgrad(learning_rate, convention=convention)
    return optax_amsgrad.amsgradw(
        learning_rate, weight_decay=weight_decay, convention=convention
    )

  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 300, seed=5)
  params = initial_params(shapes)
  bad_steps = [10, 11, 12, 57, 150, 151, 299]
  injected = _inject(grads, bad_steps, np.random.default_rng(1))
  clean = [g for k, g in enumerate(grads) if k not in bad_steps]

  protected = optax.apply_if_finite(make(), max_consecutive_errors=5)
  actual = run_optax(protected, injected, params)
  expected = run_optax(make(), clean, params)
  kept = [p for k, p in enumerate(actual) if k not in bad_steps]
  # Round-off only: inside apply_if_finite's lax.cond XLA may fuse the step
  # differently, so the last bit can differ.
  assert max_relative_difference(kept, expected) < 1e-14
  # A skipped step leaves the params where they were.
  for k in bad_steps:
    for key in actual[k]:
      np.testing.assert_array_equal(actual[k][key], actual[k - 1][key])
  reference = run_reference(
      clean, params, learning_rate=learning_rate,
      weight_decay=weight_decay or 0.0, convention=convention,
  )
  assert max_relative_difference(expected, reference) < 1e-12


def test_apply_if_finite_counts_and_keeps_the_state():
  solver = optax.apply_if_finite(optax_amsgrad.amsgrad(1e-2), max_consecutive_errors=3)
  params = {"w": jnp.ones(3)}
  state = solver.init(params)
  _, state = solver.update({"w": jnp.array([1.0, 2.0, 3.0])}, state, params)
  before = state.inner_state
  _, state = solver.update({"w": jnp.array([1.0, jnp.inf, 3.0])}, state, params)
  assert int(state.total_notfinite) == 1 and not bool(state.last_finite)
  chex.assert_trees_all_equal(state.inner_state, before)
  # Optax's tree tools still find the AMSGrad fields through the wrapper.
  nu_max = optax.tree.get(state, "nu_max")
  np.testing.assert_array_equal(nu_max["w"], before[0].nu_max["w"])


def test_apply_if_finite_with_bfloat16_state_reproduces_the_rounding():
  # The stochastic rounding draws its bits from the step count, which a
  # skipped step leaves unchanged: the rounded state is reproduced, so the
  # runs agree to float32 round-off (other rounding draws would move the
  # params by ~1e-5, bfloat16's noise).
  def make():
    return optax.apply_if_finite(
        optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        max_consecutive_errors=2,
    )

  shapes = TREE_SHAPES["deep"]
  grads = spiky_gradients(shapes, 120, seed=9)
  params = initial_params(shapes)
  bad_steps = [3, 40, 41, 100]
  injected = _inject(grads, bad_steps, np.random.default_rng(2))
  clean = [g for k, g in enumerate(grads) if k not in bad_steps]
  actual = run_optax(make(), injected, params, dtype=jnp.float32)
  expected = run_optax(make(), clean, params, dtype=jnp.float32)
  kept = [p for k, p in enumerate(actual) if k not in bad_steps]
  assert max_relative_difference(kept, expected) < 1e-6


# ----------------------------------------------------------------------------
# Huge and tiny gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_float32_gradients_give_the_exact_steps(convention):
  # |g| = 1e20 .. 3e38: g*g overflows float32 (above 1.8e19). Such gradients
  # are saturated at 9.2e18 before the moments, so nu_max stays finite. As
  # the step depends on m / sqrt(nu_max), every update, at the spike and
  # after it, is the one exact arithmetic gives with the true gradient.
  rng = np.random.default_rng(0)
  g = rng.normal(size=(400, 3)).astype(np.float32)
  g[50, 0], g[120, 1], g[200, 2], g[300, 0] = 1e30, -3e38, 1e20, -1e30
  solver = optax_amsgrad.scale_by_amsgrad(convention=convention)
  reference = ReferenceAmsgrad((3,), convention=convention)
  state = solver.init(jnp.zeros(3, jnp.float32))
  step = jax.jit(solver.update)
  for k in range(len(g)):
    updates, state = step(jnp.asarray(g[k]), state)
    expected = reference.step(g[k].astype(np.float64))
    np.testing.assert_allclose(
        np.asarray(updates, np.float64), expected, rtol=0, atol=FLOAT32_UPDATE_ATOL,
        err_msg=f"step {k}",
    )
    if k in (50, 120, 200, 300):
      assert abs(float(updates[np.argmax(np.abs(g[k]))])) > 0.1
  for leaf in (state.mu, state.nu, state.nu_max):
    assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("convention", ["keras", "optax", "paper"])
def test_huge_complex_gradients_keep_their_phase(convention):
  g = np.array([1e30 * np.exp(0.3j), 2e38 * np.exp(-2.0j), 1.0 + 1.0j], np.complex64)
  solver = optax_amsgrad.scale_by_amsgrad(convention=convention)
  reference = ReferenceAmsgrad((3,), convention=convention, complex_params=True)
  state = solver.init(jnp.zeros(3, jnp.complex64))
  for _ in range(3):
    updates, state = solver.update(jnp.asarray(g), state)
    expected = reference.step(g.astype(np.complex128))
    np.testing.assert_allclose(
        np.asarray(updates, np.complex128), expected, rtol=0,
        atol=FLOAT32_UPDATE_ATOL,
    )


def test_saturation_leaves_inf_and_nan_visible():
  # inf is not clipped to a large finite gradient: optax.apply_if_finite must
  # still see it, and the plain update is NaN, never a silent finite step.
  solver = optax_amsgrad.scale_by_amsgrad()
  g = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 1.0], jnp.float32)
  updates, state = solver.update(g, solver.init(g))
  assert bool(jnp.all(jnp.isnan(updates[:3]))) and bool(jnp.isfinite(updates[3]))
  assert bool(jnp.all(~jnp.isfinite(state.nu_max[:3])))


def test_float64_is_not_saturated_below_its_own_limit():
  g = np.array([1e150, -1e100, 1.0])
  solver = optax_amsgrad.scale_by_amsgrad()
  reference = ReferenceAmsgrad((3,))
  state = solver.init(jnp.zeros(3))
  for _ in range(3):
    updates, state = solver.update(jnp.asarray(g), state)
    np.testing.assert_allclose(updates, reference.step(g), rtol=1e-12)
  np.testing.assert_allclose(state.nu[0], reference.v[0], rtol=1e-12)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_tiny_float32_gradients(convention):
  # Normal float32 values: exact. Below that, XLA flushes subnormal values to
  # zero (m = (1 - b1) g first), so the update is 0 where exact arithmetic
  # gives |u| <= |g| / ((1 - b1) eps) < 1e-27: never NaN or inf with eps > 0.
  solver = optax_amsgrad.scale_by_amsgrad(convention=convention)
  normal = np.array([1e-30, -1e-20, 3e-12], np.float32)
  subnormal = np.array([1e-37, -1e-40, 1e-44], np.float32)
  reference = ReferenceAmsgrad((6,), convention=convention)
  state = solver.init(jnp.zeros(6, jnp.float32))
  step = jax.jit(solver.update)
  for _ in range(4):
    g = np.concatenate([normal, subnormal])
    updates, state = step(jnp.asarray(g), state)
    expected = reference.step(g.astype(np.float64))
    u = np.asarray(updates, np.float64)
    np.testing.assert_allclose(u[:3], expected[:3], rtol=1e-5)
    assert np.all(np.isfinite(u[3:])) and np.all(np.abs(u[3:] - expected[3:]) < 1e-27)


def test_zero_eps_documented_limit():
  # With eps = eps_root = 0 the update is m / sqrt(nu_max): a coordinate whose
  # gradients were all 0 gets 0/0 = NaN (PyTorch does the same), and float32
  # gradients below 1.1e-19 have a square that underflows to 0, so inf.
  solver = optax_amsgrad.scale_by_amsgrad(eps=0.0)
  g = jnp.array([0.0, 1e-30, 1e-3], jnp.float32)
  updates, _ = solver.update(g, solver.init(g))
  assert bool(jnp.isnan(updates[0])) and bool(jnp.isinf(updates[1]))
  np.testing.assert_allclose(float(updates[2]), 1.0, rtol=1e-5)
  # Any eps > 0 or eps_root > 0 avoids both.
  for options in ({"eps": 1e-12}, {"eps": 0.0, "eps_root": 1e-30}):
    solver = optax_amsgrad.scale_by_amsgrad(**options)
    updates, _ = solver.update(g, solver.init(g))
    assert bool(jnp.all(jnp.isfinite(updates)))


def _narrow_run(dtype, steps=400, **options):
  # |g| up to 2000: |g|**2 = 4e6 overflows float16 (max 65504) once v has
  # grown, after about a hundred steps.
  rng = np.random.default_rng(4)
  solver = optax_amsgrad.scale_by_amsgrad(**options)
  reference = ReferenceAmsgrad((8,))
  state = solver.init(jnp.zeros(8, dtype))
  step = jax.jit(solver.update)
  worst = 0.0
  for _ in range(steps):
    g = jnp.asarray(rng.normal(size=8) * 1000.0, dtype)
    updates, state = step(g, state)
    assert updates.dtype == dtype
    expected = reference.step(np.asarray(g.astype(jnp.float64)))
    worst = max(worst, float(np.max(np.abs(np.asarray(updates, np.float64) - expected))))
  for leaf in (state.mu, state.nu, state.nu_max):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  return worst


@pytest.mark.parametrize("nu_dtype", [jnp.float32, jnp.bfloat16])
def test_float16_params_with_large_gradients(nu_dtype):
  # Arithmetic is float32, so |g| > 256 does not overflow g*g; nu is kept
  # where |g|**2 fits. The updates (about 1) follow the reference to the
  # precision of the float16 first moment and of the returned update.
  assert _narrow_run(jnp.float16, nu_dtype=nu_dtype) < 2e-2


def test_float16_params_with_large_gradients_default_state():
  assert _narrow_run(jnp.float16) < 2e-2


def test_bfloat16_params_with_huge_gradients():
  g = jnp.array([1e30, -3e38, 1.0], jnp.bfloat16)
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init(g)
  reference = ReferenceAmsgrad((3,))
  for _ in range(3):
    updates, state = solver.update(g, state)
    expected = reference.step(np.asarray(g.astype(jnp.float64)))
    np.testing.assert_allclose(np.asarray(updates, np.float64), expected, rtol=1e-2)
  for leaf in (state.mu, state.nu, state.nu_max):
    assert bool(jnp.all(jnp.isfinite(leaf)))


# ----------------------------------------------------------------------------
# The step counter and long runs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(("b1", "b2"), [(0.9, 0.999), (0.0, 0.0), (0.999, 0.99999)])
def test_counter_saturates_and_bias_corrections_stay_exact(convention, dtype, b1, b2):
  # From 2**31 - 3 the count reaches 2**31 - 1 and stays there (it would wrap
  # to a negative number and make b**t infinite); the updates are those of
  # step 2**31 - 1, where both bias corrections are 1.
  solver = optax_amsgrad.scale_by_amsgrad(b1=b1, b2=b2, convention=convention)
  rng = np.random.default_rng(6)
  params = jnp.zeros(5, dtype)
  state = solver.init(params)._replace(
      count=jnp.array(INT32_MAX - 3, jnp.int32),
      mu=jnp.asarray(rng.normal(size=5), dtype),
      nu=jnp.asarray(rng.random(size=5), dtype),
      nu_max=jnp.asarray(1.0 + rng.random(size=5), dtype),
  )
  reference = ReferenceAmsgrad((5,), b1=b1, b2=b2, convention=convention)
  reference.m, reference.v, reference.v_max = (
      np.asarray(x, np.float64) for x in (state.mu, state.nu, state.nu_max)
  )
  step = jax.jit(solver.update)
  for k in range(5):
    g = rng.normal(size=5)
    reference.t = min(INT32_MAX - 3 + k, INT32_MAX - 1)
    updates, state = step(jnp.asarray(g, dtype), state)
    assert int(state.count) == min(INT32_MAX - 2 + k, INT32_MAX)
    expected = reference.step(np.asarray(jnp.asarray(g, dtype), np.float64))
    tolerance = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(np.asarray(updates, np.float64), expected, rtol=tolerance)
  assert int(state.count) == INT32_MAX


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("count", [0, 1, 9, 999, 2**20, 2**30])
@pytest.mark.parametrize(("b1", "b2"), [(0.0, 0.0), (0.9, 0.999), (0.999999, 0.9999999)])
def test_bias_corrections_finite_at_any_count(convention, count, b1, b2):
  # float64: 1 - b**t from t = 1 (as small as 1e-7 here) to 2**30.
  solver = optax_amsgrad.scale_by_amsgrad(b1=b1, b2=b2, convention=convention)
  rng = np.random.default_rng(count)
  state = solver.init(jnp.zeros(4))._replace(
      count=jnp.array(count, jnp.int32),
      nu=jnp.asarray(rng.random(size=4)),
      nu_max=jnp.asarray(1.0 + rng.random(size=4)),
  )
  reference = ReferenceAmsgrad((4,), b1=b1, b2=b2, convention=convention, t=count)
  reference.m, reference.v, reference.v_max = (
      np.asarray(x, np.float64) for x in (state.mu, state.nu, state.nu_max)
  )
  g = rng.normal(size=4)
  updates, _ = solver.update(jnp.asarray(g), state)
  assert bool(jnp.all(jnp.isfinite(updates)))
  np.testing.assert_allclose(updates, reference.step(g), rtol=1e-9)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_long_float64_run_does_not_drift(convention):
  # 20,000 steps with rare 100x spikes: the whole trajectory stays at float64
  # round-off from the reference (measured: below 1e-15).
  shapes = {"w": (4,), "b": ()}
  grads = spiky_gradients(shapes, 20_000, seed=11)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-3, convention=convention)
  actual = run_optax(optax_amsgrad.amsgrad(1e-3, convention=convention), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


def test_long_float32_run_keeps_the_state_exact():
  # 100,000 float32 steps: mu, nu and nu_max stay within float32 round-off of
  # the exact averages and maximum (no drift or ratcheting), nothing overflows.
  rng = np.random.default_rng(12)
  n = 100_000
  g = rng.normal(size=(n, 4)) * np.where(rng.random(size=(n, 4)) < 0.01, 100.0, 1.0)
  g = g.astype(np.float32)
  solver = optax_amsgrad.scale_by_amsgrad()

  @jax.jit
  def run(g):
    def step(state, g):
      return solver.update(g, state)[1], None

    return jax.lax.scan(step, solver.init(jnp.zeros(4, jnp.float32)), g)[0]

  state = run(jnp.asarray(g))
  reference = ReferenceAmsgrad((4,))
  for row in g.astype(np.float64):
    reference.step(row)
  assert int(state.count) == n
  # float32(0.999) is 0.99900001: the float32 average weighs old terms a
  # little more, a bias of about 1.3e-5 relative in nu, and no more than that.
  np.testing.assert_allclose(state.nu_max, reference.v_max, rtol=5e-5)
  np.testing.assert_allclose(state.nu, reference.v, rtol=5e-5)
  np.testing.assert_allclose(state.mu, reference.m, rtol=1e-5, atol=1e-6)
