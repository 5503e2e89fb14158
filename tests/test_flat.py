"""flatten_by_dtype: AMSGrad on one contiguous buffer per dtype.

Correctness is checked against the float64 NumPy reference; the rest checks
that the wrapper still behaves as an Optax transformation (chains, jit,
inject_hyperparams, masks outside it, checkpoints) and that its state really
is one buffer per dtype.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import checkpoint
from optax_amsgrad._flat import (
  FlatState,
  flatten_by_dtype,
  ravel_by_dtype,
  unravel_by_dtype,
)

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import ReferenceAmsgrad, run_reference
from trajectories import CONVENTIONS, max_relative_difference, run_optax, scaled

pytestmark = pytest.mark.both_modes


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("tree", sorted(TREE_SHAPES))
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_matches_reference_float64(convention, tree):
  shapes = TREE_SHAPES[tree]
  grads = spiky_gradients(shapes, 300, seed=3)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  actual = run_optax(flatten_by_dtype(scaled(convention)), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_amsgradw_with_mask_outside_matches_reference():
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 200, seed=2)
  params = initial_params(shapes)
  lr, wd = 1e-2, 0.1
  solver = optax.chain(
      flatten_by_dtype(optax_amsgrad.scale_by_amsgrad()),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(lr),
  )
  expected = run_reference(grads, params, learning_rate=lr, weight_decay=wd)
  assert max_relative_difference(run_optax(solver, grads, params), expected) < 1e-12
  # A mask that leaves out the bias: its trajectory is plain AMSGrad.
  masked = optax.chain(
      flatten_by_dtype(optax_amsgrad.scale_by_amsgrad()),
      optax.add_decayed_weights(wd, mask={"kernel": True, "bias": False, "scalar": True}),
      optax.scale_by_learning_rate(lr),
  )
  actual = run_optax(masked, grads, params)
  plain = run_reference(grads, params, learning_rate=lr)
  decayed = run_reference(grads, params, learning_rate=lr, weight_decay=wd)
  assert max_relative_difference(
      [{"bias": a["bias"]} for a in actual], [{"bias": e["bias"]} for e in plain]
  ) < 1e-12
  assert max_relative_difference(
      [{"kernel": a["kernel"]} for a in actual], [{"kernel": e["kernel"]} for e in decayed]
  ) < 1e-12


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_state_is_one_buffer_per_dtype():
  params = {
      "a": jnp.ones((3, 4), jnp.float32),
      "b": jnp.ones(5, jnp.float64),
      "c": jnp.ones((), jnp.float32),
      "d": jnp.ones(2, jnp.bfloat16),
      "e": jnp.ones(3, jnp.complex64),
  }
  state = flatten_by_dtype(optax_amsgrad.scale_by_amsgrad()).init(params)
  assert isinstance(state, FlatState)
  inner = state.inner_state
  assert isinstance(inner, optax_amsgrad.ScaleByAmsgradState)
  for moment in (inner.mu, inner.nu, inner.nu_max):
    assert sorted(moment) == ["bfloat16", "complex64", "float32", "float64"]
    assert {k: v.shape for k, v in moment.items()} == {
        "bfloat16": (2,), "complex64": (3,), "float32": (13,), "float64": (5,)
    }
  assert inner.mu["bfloat16"].dtype == jnp.bfloat16
  assert inner.nu_max["float64"].dtype == jnp.float64
  # Optax's tree tools find the fields through the wrapper.
  assert sorted(optax.tree.get(state, "nu_max")) == sorted(inner.nu_max)


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_mixed_dtypes_follow_reference_and_keep_dtypes():
  # Each dtype group is its own AMSGrad: the float64 leaf is exact, the
  # float32 ones agree to float32 round-off, step by step.
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.zeros((4, 3), jnp.float32),
      "b": jnp.zeros(3, jnp.float32),
      "x": jnp.zeros(6, jnp.float64),
  }
  solver = flatten_by_dtype(optax_amsgrad.scale_by_amsgrad())
  state = solver.init(params)
  step = jax.jit(solver.update)
  references = {k: ReferenceAmsgrad(v.shape) for k, v in params.items()}
  for _ in range(100):
    grads = {
        k: (rng.normal(size=v.shape) * rng.choice([1.0, 30.0], p=[0.97, 0.03]))
        .astype(v.dtype)
        for k, v in params.items()
    }
    flat = {k: np.asarray(v, np.float64) for k, v in state.inner_state.mu.items()}
    flat_v = {k: np.asarray(v, np.float64) for k, v in state.inner_state.nu.items()}
    flat_max = {k: np.asarray(v, np.float64) for k, v in state.inner_state.nu_max.items()}
    # Restart each reference from the stored state, cut out of the buffers.
    offsets = {"float32": {"b": 0, "w": 3}, "float64": {"x": 0}}
    for k, ref in references.items():
      dtype = str(params[k].dtype)
      start, size = offsets[dtype][k], params[k].size
      ref.m = flat[dtype][start:start + size].reshape(params[k].shape)
      ref.v = flat_v[dtype][start:start + size].reshape(params[k].shape)
      ref.v_max = flat_max[dtype][start:start + size].reshape(params[k].shape)
    updates, state = step(grads, state)
    for k, ref in references.items():
      expected = ref.step(grads[k])
      assert updates[k].dtype == params[k].dtype
      if params[k].dtype == jnp.float64:
        np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=1e-13)
      else:
        np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_ravel_and_unravel_round_trip_and_differentiate():
  tree = {
      "a": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
      "b": jnp.arange(4.0, dtype=jnp.float64),
      "c": jnp.float32(7.0),
      "d": jnp.zeros((0, 5), jnp.float32),
  }
  flat = ravel_by_dtype(tree)
  # Leaves in jax.tree.leaves order (sorted keys), the empty one adds nothing.
  np.testing.assert_array_equal(np.asarray(flat["float32"]), [0, 1, 2, 3, 4, 5, 7.0])
  back = unravel_by_dtype(flat, tree)
  for k in tree:
    assert back[k].dtype == tree[k].dtype and back[k].shape == tree[k].shape
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))
  # The derivative of unravel is a ravel: d/dflat sum(leaf**2) = 2 * flat.
  grads = jax.grad(
      lambda f: sum(jnp.sum(x.astype(jnp.float64) ** 2)
                    for x in jax.tree.leaves(unravel_by_dtype(f, tree)))
  )(flat)
  for k, buffer in flat.items():
    np.testing.assert_allclose(np.asarray(grads[k]), 2 * np.asarray(buffer))


def test_unravel_rejects_buffers_of_another_tree():
  tree = {"a": jnp.ones(3, jnp.float32)}
  with pytest.raises(ValueError, match="do not match the tree"):
    unravel_by_dtype({"float32": jnp.ones(4, jnp.float32)}, tree)
  with pytest.raises(ValueError, match="do not match the tree"):
    unravel_by_dtype({"float64": jnp.ones(3, jnp.float64)}, tree)


def test_gradients_of_another_shape_are_rejected():
  solver = flatten_by_dtype(optax_amsgrad.scale_by_amsgrad())
  state = solver.init({"a": jnp.ones(3, jnp.float32)})
  with pytest.raises(ValueError, match="gradient"):
    solver.update({"a": jnp.ones(4, jnp.float32)}, state)


def test_state_of_another_optimizer_is_rejected():
  solver = flatten_by_dtype(optax_amsgrad.scale_by_amsgrad())
  params = {"a": jnp.ones(3)}
  with pytest.raises(TypeError, match="FlatState"):
    solver.update(params, optax_amsgrad.scale_by_amsgrad().init(params))


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_inject_hyperparams_inside_and_outside():
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 60, seed=5)
  params = initial_params(shapes)

  def schedule(step):
    return 1e-2 / (1.0 + 0.1 * step)

  expected = run_reference(grads, params, learning_rate=schedule, b1=0.8)
  inside = flatten_by_dtype(
      optax.inject_hyperparams(optax_amsgrad.amsgrad)(learning_rate=schedule, b1=0.8)
  )
  outside = optax.inject_hyperparams(
      lambda learning_rate, b1: flatten_by_dtype(optax_amsgrad.amsgrad(learning_rate, b1))
  )(learning_rate=schedule, b1=0.8)
  for solver in (inside, outside):
    assert max_relative_difference(run_optax(solver, grads, params), expected) < 1e-12

  # A hyperparameter set by hand between steps takes effect.
  solver = flatten_by_dtype(optax.inject_hyperparams(optax_amsgrad.amsgrad)(learning_rate=1e-2))
  p = jax.tree.map(jnp.asarray, params)
  state = solver.init(p)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  updates, _ = jax.jit(solver.update)(jax.tree.map(jnp.asarray, grads[0]), state)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_multisteps_and_masked_wrap_it():
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 40, seed=4)
  params = initial_params(shapes)
  # Every step accumulates two gradients: with the same gradient repeated
  # twice, the accumulated mean is that gradient (exactly, in float64).
  doubled = [g for g in grads for _ in range(2)]
  multi = optax.MultiSteps(
      flatten_by_dtype(scaled("pytorch")), every_k_schedule=2,
      accumulator_dtype=jnp.float64,
  )
  actual = run_optax(multi, doubled, params)[1::2]
  expected = run_reference(grads, params, learning_rate=1e-2)
  assert max_relative_difference(actual, expected) < 1e-12

  mask = {"kernel": True, "bias": True, "scalar": False}
  masked = optax.masked(flatten_by_dtype(scaled("pytorch")), mask)
  actual = run_optax(masked, grads, params)
  assert max_relative_difference(
      [{k: a[k] for k in ("kernel", "bias")} for a in actual],
      [{k: e[k] for k in ("kernel", "bias")} for e in expected[: len(grads)]],
  ) < 1e-12


def test_resumed_run_is_bit_identical(tmp_path):
  rng = np.random.default_rng(1)
  params = {f"layer{i}": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                          "b": jnp.zeros(3, jnp.bfloat16)} for i in range(3)}
  all_grads = [
      jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
      for _ in range(12)
  ]
  solver = flatten_by_dtype(optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16))

  @jax.jit
  def step(params, state, grads):
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = solver.init(params)
  for g in all_grads[:5]:
    params, state = step(params, state, g)
  checkpoint.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  uninterrupted = (params, state)
  for g in all_grads[5:]:
    uninterrupted = step(*uninterrupted, g)

  fresh = jax.tree.map(jnp.zeros_like, params)
  restored = checkpoint.restore(
      tmp_path / "ckpt", {"params": fresh, "opt_state": solver.init(fresh)}
  )
  resumed = (restored["params"], restored["opt_state"])
  for g in all_grads[5:]:
    resumed = step(*resumed, g)
  chex.assert_trees_all_equal(resumed, uninterrupted, strict=True)
  assert not np.array_equal(
      np.asarray(uninterrupted[0]["layer0"]["w"]), np.asarray(params["layer0"]["w"])
  )


def test_compiled_step_has_few_kernels_per_leaf():
  # The point of the layout: the state update is a few kernels over the whole
  # buffer, whatever the number of leaves; only the final cut into leaves
  # (fused with apply_updates) costs one kernel per leaf. On the XLA path
  # (every platform but CPU) a tree takes three more per leaf; on CPU the
  # moment handler already takes up to 32 leaves per call. Kernels are XLA
  # fusions and handler calls.
  params = {f"b{i:03d}": jnp.zeros(16, jnp.float32) for i in range(40)}

  def fusions(solver):
    def step(params, state, grads):
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, solver.init(params), params).compile().as_text()
    entry = text.split("\nENTRY", 1)[1]
    return sum(" fusion(" in line or " custom-call(" in line
               for line in entry.splitlines())

  tree = fusions(optax_amsgrad.amsgrad(1e-3, implementation="xla"))
  flat = fusions(flatten_by_dtype(optax_amsgrad.amsgrad(1e-3, implementation="xla")))
  assert tree >= 3 * len(params)
  assert flat <= len(params) + 10
  assert fusions(optax_amsgrad.amsgrad(1e-3)) <= len(params) + 10
