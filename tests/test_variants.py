"""The core behaviours under chex's variants: the same step called eagerly,
jitted, and eagerly on arrays placed on a device, against the float64 NumPy
reference (tests/reference.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import CONVENTIONS

STEPS = 20
LEARNING_RATE = 1e-2
VARIANTS = {"with_jit": True, "without_jit": True, "with_device": True}


def reference(convention: str, **options):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, STEPS, seed=11)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=LEARNING_RATE,
                           convention=convention, **options)
  return grads, params, expected


class CoreVariantsTest(chex.TestCase):

  @chex.variants(**VARIANTS)
  @parameterized.parameters(*CONVENTIONS)
  def test_update_follows_the_reference(self, convention):
    grads, params, expected = reference(convention, eps_root=1e-12)
    solver = optax_amsgrad.amsgrad(LEARNING_RATE, convention=convention, eps_root=1e-12)
    params = jax.tree.map(jnp.asarray, params)
    state = solver.init(params)
    update = self.variant(solver.update)
    for g, want in zip(grads, expected, strict=True):
      updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
      params = optax.apply_updates(params, updates)
      chex.assert_trees_all_close(params, want, rtol=1e-12, atol=0)
    chex.assert_trees_all_equal(optax.tree.get(state, "count"), STEPS)

  @chex.variants(**VARIANTS)
  @parameterized.parameters("pytorch", "keras")
  def test_apply_step_with_weight_decay_follows_the_reference(self, convention):
    grads, params, expected = reference(convention, eps_root=0.0)
    expected = run_reference(grads, params, learning_rate=LEARNING_RATE,
                             weight_decay=0.1, convention=convention)
    solver = optax_amsgrad.amsgradw(LEARNING_RATE, weight_decay=0.1, convention=convention)
    params = jax.tree.map(jnp.asarray, params)
    state = solver.init(params)
    step = self.variant(lambda g, s, p: optax_amsgrad.apply_step(solver, g, s, p))
    for g, want in zip(grads, expected, strict=True):
      params, state = step(jax.tree.map(jnp.asarray, g), state, params)
      chex.assert_trees_all_close(params, want, rtol=1e-12, atol=0)

  @chex.variants(**VARIANTS)
  def test_state_keeps_the_params_structure_shapes_and_dtypes(self):
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": [jnp.zeros(2, jnp.bfloat16)]}
    solver = optax_amsgrad.amsgrad(LEARNING_RATE, nu_dtype=jnp.bfloat16)
    state = solver.init(params)
    _, new_state = self.variant(solver.update)(params, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    core = new_state[0]
    chex.assert_trees_all_equal_shapes_and_dtypes(core.mu, params)
    chex.assert_trees_all_equal_structs(core.nu, core.nu_max, params)
    chex.assert_trees_all_equal_dtypes(core.nu, jax.tree.map(
        lambda p: jnp.zeros((), jnp.bfloat16), params))

  @chex.variants(**VARIANTS)
  def test_nu_max_never_decreases(self):
    # AMSGrad's defining property: after a spike the maximum holds.
    solver = optax_amsgrad.scale_by_amsgrad()
    params = {"w": jnp.zeros(4)}
    state = solver.init(params)
    update = self.variant(solver.update)
    previous = state.nu_max
    for scale in (1.0, 100.0, 0.01, 0.0, 3.0):
      _, state = update({"w": jnp.full(4, scale)}, state)
      assert bool(jnp.all(state.nu_max["w"] >= previous["w"]))
      previous = state.nu_max
    np.testing.assert_array_less(0.009, np.asarray(state.nu_max["w"]))

  @chex.variants(**VARIANTS)
  def test_a_gradient_tree_unlike_the_state_names_the_paths(self):
    solver = optax_amsgrad.scale_by_amsgrad()
    state = solver.init({"w": jnp.zeros(3), "b": jnp.zeros(2)})
    update = self.variant(solver.update)
    with self.assertRaisesRegex(ValueError, r"in the state but not in the gradients: \['b'\]"):
      update({"w": jnp.zeros(3)}, state)
    with self.assertRaisesRegex(ValueError, r"at \['b'\]: gradient shape \(3,\), expected \(2,\)"):
      update({"w": jnp.zeros(3), "b": jnp.zeros(3)}, state)
