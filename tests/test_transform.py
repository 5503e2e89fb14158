"""scale_by_amsgrad against the independent float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import ReferenceAmsgrad, run_reference
from trajectories import CONVENTIONS, max_relative_difference, run_optax, scaled

pytestmark = pytest.mark.both_modes

STEPS = 1000


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("tree", sorted(TREE_SHAPES))
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_matches_reference_float64(convention, tree):
  shapes = TREE_SHAPES[tree]
  grads = spiky_gradients(shapes, STEPS, seed=sorted(TREE_SHAPES).index(tree))
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  actual = run_optax(scaled(convention), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(
    "options",
    [
        {"b1": 0.0, "b2": 0.5, "eps": 1e-3},
        {"b1": 0.5, "b2": 0.99, "eps": 0.0, "eps_root": 1e-8},
        {"b1": 0.95, "b2": 0.9999, "eps": 1e-6, "eps_root": 1e-4},
    ],
)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_matches_reference_with_hyperparameters(convention, options):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 300, seed=3)
  params = initial_params(shapes)
  expected = run_reference(
      grads, params, learning_rate=1e-2, convention=convention, **options
  )
  actual = run_optax(scaled(convention, **options), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


def test_conventions_really_differ():
  # The same gradients give trajectories that differ well beyond round-off:
  # choosing a convention matters, and the reference tells them apart.
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 200, seed=5)
  params = initial_params(shapes)
  runs = {c: run_optax(scaled(c, eps=1e-3), grads, params) for c in CONVENTIONS}
  for i, a in enumerate(CONVENTIONS):
    for b in CONVENTIONS[i + 1 :]:
      assert max_relative_difference(runs[a], runs[b]) > 1e-4, (a, b)


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_paper_convention_with_b1_schedule():
  shapes = TREE_SHAPES["single"]
  grads = spiky_gradients(shapes, 400, seed=7)
  params = initial_params(shapes)
  expected = run_reference(
      grads,
      params,
      learning_rate=1e-2,
      convention="paper",
      b1=lambda count: 0.9 * 0.99**count,
  )
  in_float64 = lambda count: 0.9 * jnp.power(0.99, count.astype(jnp.float64))
  actual = run_optax(scaled("paper", b1=in_float64), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12
  # Optax's schedules compute in float32, so they agree to float32 round-off.
  schedule = optax.exponential_decay(0.9, transition_steps=1, decay_rate=0.99)
  actual = run_optax(scaled("paper", b1=schedule), grads, params)
  assert max_relative_difference(actual, expected) < 1e-6


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_complex_params(convention):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 300, seed=11, dtype=np.complex128)
  params = initial_params(shapes, dtype=np.complex128)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  actual = run_optax(scaled(convention), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


def test_pytorch_complex_keeps_separate_second_moments():
  g = jnp.array([3.0 + 4.0j], jnp.complex64)
  pytorch = optax_amsgrad.scale_by_amsgrad(convention="pytorch", b2=0.5)
  optax_like = optax_amsgrad.scale_by_amsgrad(convention="optax", b2=0.5)
  _, state = pytorch.update(g, pytorch.init(g))
  # One second moment per real coordinate: (1 - b2) * (9, 16).
  np.testing.assert_allclose(np.asarray(state.nu), [4.5 + 8.0j])
  _, state = optax_like.update(g, optax_like.init(g))
  assert state.nu.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(state.nu), [12.5])


def test_state_fields_follow_optax():
  params = {"w": jnp.ones((2, 3), jnp.float32)}
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init(params)
  assert state._fields == ("count", "mu", "nu", "nu_max")
  assert state.count.dtype == jnp.int32 and int(state.count) == 0
  _, state = solver.update({"w": jnp.full((2, 3), 2.0, jnp.float32)}, state)
  nu_max = optax.tree.get(state, "nu_max")
  np.testing.assert_allclose(np.asarray(nu_max["w"]), 0.001 * 4.0, rtol=1e-6)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_float32_follows_reference(convention):
  # Each float32 step against a float64 step from the same (float32) state:
  # agreement to float32 round-off on every step of a long run.
  rng = np.random.default_rng(0)
  solver = optax_amsgrad.scale_by_amsgrad(convention=convention)
  reference = ReferenceAmsgrad((50,), convention=convention)
  state = solver.init(jnp.zeros(50, jnp.float32))
  step = jax.jit(solver.update)
  for t in range(300):
    spike = rng.choice([1.0, 30.0], p=[0.98, 0.02])
    g = (rng.normal(size=50) * spike).astype(np.float32)
    reference.t = t
    reference.m, reference.v, reference.v_max = (
        np.asarray(x, np.float64) for x in (state.mu, state.nu, state.nu_max)
    )
    updates, state = step(jnp.asarray(g), state)
    expected = reference.step(g)
    assert updates.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_params_compute_in_float32(dtype):
  # Gradients whose square overflows float16 (|g| > 256) still give the
  # float32 update, returned in the gradient's dtype.
  g = jnp.array([300.0, -1000.0, 1e-3], dtype)
  solver = optax_amsgrad.scale_by_amsgrad(mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  updates, state = solver.update(g, solver.init(g))
  assert updates.dtype == dtype
  expected = ReferenceAmsgrad((3,)).step(np.asarray(g.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(updates.astype(jnp.float32)), expected, rtol=1e-2)
  assert state.mu.dtype == jnp.float32 and state.nu_max.dtype == jnp.float32


def test_state_dtypes():
  params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.complex64)}
  solver = optax_amsgrad.scale_by_amsgrad(
      convention="optax", mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  )
  state = solver.init(params)
  assert state.mu["a"].dtype == jnp.bfloat16
  assert state.nu["a"].dtype == jnp.bfloat16
  assert state.nu_max["a"].dtype == jnp.bfloat16
  assert state.nu["b"].dtype == jnp.bfloat16
  default = optax_amsgrad.scale_by_amsgrad().init(params)
  assert default.mu["a"].dtype == jnp.float32
  assert default.nu["b"].dtype == jnp.complex64  # pytorch: one per coordinate
  optax_like = optax_amsgrad.scale_by_amsgrad(convention="optax").init(params)
  assert optax_like.nu["b"].dtype == jnp.float32


def test_jit_vmap_and_meta_gradient():
  solver = optax_amsgrad.scale_by_amsgrad(eps_root=1e-8)
  params = jnp.linspace(-1.0, 1.0, 8)

  def unrolled_loss(scale):
    p = params
    state = solver.init(p)
    for _ in range(5):
      updates, state = solver.update(scale * p, state)
      p = p - 0.1 * updates
    return jnp.sum(p**2)

  grad = jax.jit(jax.grad(unrolled_loss))(1.0)
  assert np.isfinite(float(grad))
  # Batched runs equal separate runs.
  batch = jnp.stack([params, 2 * params, -params])
  states = jax.vmap(solver.init)(batch)
  batched, _ = jax.vmap(solver.update)(batch, states)
  for row in range(3):
    single, _ = solver.update(batch[row], solver.init(batch[row]))
    np.testing.assert_array_equal(np.asarray(batched[row]), np.asarray(single))


def test_zero_gradient_at_zero_state_without_eps_root_is_not_nan():
  for convention in CONVENTIONS:
    solver = optax_amsgrad.scale_by_amsgrad(convention=convention)
    g = jnp.zeros(4)
    updates, _ = solver.update(g, solver.init(g))
    np.testing.assert_array_equal(np.asarray(updates), 0.0)


def test_count_saturates():
  solver = optax_amsgrad.scale_by_amsgrad()
  g = jnp.ones(3)
  state = solver.init(g)._replace(count=jnp.array(2**31 - 1, jnp.int32))
  updates, state = solver.update(g, state)
  assert int(state.count) == 2**31 - 1
  assert np.all(np.isfinite(np.asarray(updates)))


def test_early_spike_is_not_held_forever():
  # The README's reason for the default: "optax" holds the debiased one-sample
  # estimate g_1**2 = 100 in nu_max, so the update of unit gradients stays at
  # 1 / sqrt(100); "pytorch" debiases the raw maximum at use and recovers.
  grads = jnp.concatenate([jnp.array([10.0]), jnp.ones(4999)])[:, None]

  def final_update(convention):
    solver = optax_amsgrad.scale_by_amsgrad(convention=convention)

    def step(state, g):
      update, state = solver.update(g, state)
      return state, update[0]

    _, updates = jax.lax.scan(step, solver.init(jnp.zeros(1)), grads)
    return np.asarray(updates)

  optax_like, pytorch = final_update("optax"), final_update("pytorch")
  np.testing.assert_allclose(optax_like[-1], 0.1, rtol=1e-6)
  assert pytorch[999] > 0.97 and pytorch[-1] > 0.999
