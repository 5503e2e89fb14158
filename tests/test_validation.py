"""Bad input: every class either raises an error that names the argument or
the tree path and what was expected, or has a documented behaviour checked
here against the NumPy reference (README, "Behaviour on bad input")."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import _validation

from reference import ReferenceAmsgrad

pytestmark = pytest.mark.both_modes


def _one_step_reference(g, **options) -> np.ndarray:
  return ReferenceAmsgrad(np.shape(g), **options).step(np.asarray(g))


# ----------------------------------------------------------------------------
# Tree structure, shapes and dtypes of the gradients.
# ----------------------------------------------------------------------------


def test_missing_and_extra_leaves_are_named():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"w": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"does not match the optimizer state") as info:
    solver.update({"w": jnp.ones(3), "bias": jnp.ones(2)}, state)
  message = str(info.value)
  assert "in the state but not in the gradients: ['b']" in message
  assert "in the gradients but not in the state: ['bias']" in message


def test_container_type_difference_is_explained():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init([jnp.ones(3), jnp.ones(2)])
  with pytest.raises(ValueError, match="different container types"):
    solver.update((jnp.ones(3), jnp.ones(2)), state)


def test_none_gradient_where_the_state_has_an_array_is_named():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"w": jnp.ones(3), "b": jnp.ones(2)})
  expected = "None in the gradients where the state has an array: ['b']"
  with pytest.raises(ValueError, match=re.escape(expected)):
    solver.update({"w": jnp.ones(3), "b": None}, state)


def test_shape_mismatch_names_path_and_both_shapes():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"layer": [jnp.ones((1, 3)), jnp.ones(2)]})
  with pytest.raises(ValueError) as info:
    solver.update({"layer": [jnp.ones(3), jnp.ones(2)]}, state)
  assert "at ['layer'][0]: gradient shape (3,), expected (1, 3)" in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_integer_and_boolean_params_are_refused_at_init(dtype):
  solver = optax_amsgrad.amsgrad(0.1)
  params = {"ok": jnp.ones(2), "steps": jnp.zeros(3, dtype)}
  with pytest.raises(TypeError) as info:
    solver.init(params)
  message = str(info.value)
  assert "['steps']" in message and str(jnp.dtype(dtype)) in message
  assert "optax.masked" in message


def test_integer_gradients_are_refused():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"w": jnp.ones(3)})
  with pytest.raises(TypeError, match=r"gradient at \['w'\] has dtype int32"):
    solver.update({"w": jnp.ones(3, jnp.int32)}, state)


def test_non_array_leaf_is_named():
  solver = optax_amsgrad.scale_by_amsgrad()
  with pytest.raises(TypeError, match=r"leaf at \['name'\] is a str"):
    solver.init({"w": jnp.ones(2), "name": "encoder"})


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(jnp.float32, jnp.complex64), (jnp.complex64, jnp.float32)],
)
def test_complex_real_mismatch_is_refused(param_dtype, grad_dtype):
  # Sharing moments between a real and a complex array would silently drop
  # an imaginary part on every step.
  solver = optax_amsgrad.scale_by_amsgrad(convention="optax")
  state = solver.init({"z": jnp.ones(2, param_dtype)})
  with pytest.raises(TypeError, match=r"gradient at \['z'\] is (complex|real)"):
    solver.update({"z": jnp.ones(2, grad_dtype)}, state)


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "rtol"),
    [
        # Mixed precision: low-precision gradients, float32 state.
        (jnp.float32, jnp.bfloat16, 1e-2),
        (jnp.float32, jnp.float16, 1e-3),
        # Wider gradients than the state: computed in the gradient's dtype.
        (jnp.float32, jnp.float64, 1e-6),
    ],
)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_float_width_mismatch_is_documented_behaviour(param_dtype, grad_dtype, rtol):
  # The state keeps its dtype, the update comes back in the gradient's dtype,
  # and the arithmetic is float32 or wider.
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init(jnp.zeros(4, param_dtype))
  rng = np.random.default_rng(0)
  reference = ReferenceAmsgrad((4,))
  for _ in range(5):
    g = jnp.asarray(rng.normal(size=4), grad_dtype)
    updates, state = solver.update(g, state)
    assert updates.dtype == grad_dtype
    assert state.mu.dtype == state.nu.dtype == state.nu_max.dtype == param_dtype
    expected = reference.step(np.asarray(g.astype(jnp.float64)))
    np.testing.assert_allclose(
        np.asarray(updates.astype(jnp.float64)), expected, rtol=rtol
    )


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_none_leaves_stay_none():
  solver = optax_amsgrad.scale_by_amsgrad()
  params = {"w": jnp.ones(3), "frozen": None, "nested": [None, jnp.ones(2)]}
  state = solver.init(params)
  assert state.mu["frozen"] is None and state.nu_max["nested"][0] is None
  g = {"w": jnp.array([1.0, -2.0, 3.0]), "frozen": None,
       "nested": [None, jnp.array([0.5, -0.5])]}
  updates, _ = solver.update(g, state)
  assert updates["frozen"] is None and updates["nested"][0] is None
  np.testing.assert_allclose(updates["w"], _one_step_reference(g["w"]), rtol=1e-12)
  np.testing.assert_allclose(
      updates["nested"][1], _one_step_reference(g["nested"][1]), rtol=1e-12
  )


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_masked_nodes_from_optax_masked():
  # optax.masked hands the inner transformation optax.MaskedNode where the
  # mask is False: no state is kept there and the gradient passes unchanged.
  solver = optax.masked(
      optax_amsgrad.scale_by_amsgrad(), {"w": True, "embedding": False}
  )
  params = {"w": jnp.ones(3), "embedding": jnp.ones((2, 2))}
  state = solver.init(params)
  assert isinstance(state.inner_state.mu["embedding"], optax.MaskedNode)
  g = {"w": jnp.array([1.0, -2.0, 3.0]), "embedding": jnp.full((2, 2), 7.0)}
  updates, _ = solver.update(g, state)
  np.testing.assert_array_equal(updates["embedding"], g["embedding"])
  np.testing.assert_allclose(updates["w"], _one_step_reference(g["w"]), rtol=1e-12)


def test_masked_node_leaves_given_directly():
  solver = optax_amsgrad.scale_by_amsgrad()
  params = {"w": jnp.ones(2), "skip": optax.MaskedNode()}
  state = solver.init(params)
  updates, state = solver.update({"w": jnp.ones(2), "skip": optax.MaskedNode()}, state)
  assert isinstance(updates["skip"], optax.MaskedNode)
  assert int(state.count) == 1


@pytest.mark.parametrize("empty", [{}, [], (), None])
def test_empty_tree_only_counts(empty):
  solver = optax_amsgrad.amsgrad(0.1)
  state = solver.init(empty)
  updates, state = jax.jit(solver.update)(empty, state)
  assert updates == empty
  assert int(state[0].count) == 1


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0, 2)])
def test_zero_size_arrays(shape):
  solver = optax_amsgrad.scale_by_amsgrad(
      mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16  # the stochastic rounding path
  )
  params = {"empty": jnp.zeros(shape, jnp.float32), "w": jnp.ones(2, jnp.float32)}
  state = solver.init(params)
  g = {"empty": jnp.zeros(shape, jnp.float32), "w": jnp.array([1.0, -1.0], jnp.float32)}
  updates, state = jax.jit(solver.update)(g, state)
  assert updates["empty"].shape == shape and state.nu_max["empty"].shape == shape
  np.testing.assert_allclose(
      np.asarray(updates["w"], np.float64), _one_step_reference(g["w"]), rtol=1e-2
  )


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_scalar_params_and_python_numbers():
  # 0-d arrays work like any leaf; plain Python numbers are taken as arrays
  # of JAX's default float dtype.
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"scale": jnp.array(1.0), "python": 2.0})
  reference = {k: ReferenceAmsgrad(()) for k in ("scale", "python")}
  for g in (0.5, -3.0, 1e-3):
    updates, state = solver.update({"scale": jnp.array(g), "python": g}, state)
    for key in reference:
      assert jnp.shape(updates[key]) == ()
      np.testing.assert_allclose(
          float(updates[key]), reference[key].step(np.array(g)), rtol=1e-12
      )


# ----------------------------------------------------------------------------
# Hyperparameters.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_decay_out_of_range(name, value):
  with pytest.raises(ValueError, match=rf"{name} must be in the range \[0, 1\)"):
    optax_amsgrad.scale_by_amsgrad(**{name: value})


@pytest.mark.parametrize("name", ["eps", "eps_root"])
@pytest.mark.parametrize("value", [-1e-8, float("nan"), float("inf")])
def test_eps_out_of_range(name, value):
  with pytest.raises(ValueError, match=rf"{name} must be finite and >= 0"):
    optax_amsgrad.amsgrad(0.1, **{name: value})


@pytest.mark.parametrize("name", ["b1", "b2", "eps", "eps_root"])
@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("0.9", "not a string"),
        ([0.9], "got a list"),
        (None, "got None"),
        (True, "boolean"),
        (0.9 + 0j, "must be real"),
        (np.array([0.9, 0.9]), "shape"),
    ],
)
def test_hyperparameter_of_the_wrong_type(name, value, what):
  with pytest.raises(TypeError, match=rf"^{name} .*{what}"):
    optax_amsgrad.scale_by_amsgrad(**{name: value})


def test_weight_decay_is_checked():
  with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
    optax_amsgrad.amsgradw(0.1, weight_decay=-1.0)
  with pytest.raises(TypeError, match="weight_decay must be a real number"):
    optax_amsgrad.amsgradw(0.1, weight_decay="1e-2")


def test_schedule_only_for_b1_with_the_paper_convention():
  with pytest.raises(ValueError, match=r"needs convention='paper'.*'pytorch'"):
    optax_amsgrad.scale_by_amsgrad(b1=lambda t: 0.9)
  with pytest.raises(TypeError, match="b2 must be a real number; got the callable"):
    optax_amsgrad.scale_by_amsgrad(b2=optax.constant_schedule(0.99), convention="paper")


def test_b1_schedule_is_checked_at_step_zero():
  with pytest.raises(ValueError, match=r"b1 schedule at step 0 must be in the range"):
    optax_amsgrad.scale_by_amsgrad(b1=lambda t: 1.0 + 0.0 * t, convention="paper")
  with pytest.raises(TypeError, match="b1 schedule must return a scalar"):
    optax_amsgrad.scale_by_amsgrad(b1=lambda t: jnp.full(3, 0.9), convention="paper")
  with pytest.raises(TypeError, match="calling it with the step count 0"):
    optax_amsgrad.scale_by_amsgrad(b1=lambda: 0.9, convention="paper")
  # A valid schedule is accepted and used (see test_transform for the values).
  optax_amsgrad.scale_by_amsgrad(b1=lambda t: 0.9 / (1.0 + t), convention="paper")


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_decay_that_rounds_to_one_in_float32():
  # 0.99999999 < 1, but float32(0.99999999) == 1.0: 1 - b2**t would be 0 and
  # the update NaN. float64 params compute in float64, where it is fine.
  solver = optax_amsgrad.scale_by_amsgrad(b2=0.99999999)
  state = solver.init({"w": jnp.ones(2, jnp.float32)})
  with pytest.raises(ValueError, match=r"b2=0.99999999 rounds to 1.0 in float32.*\['w'\]"):
    solver.update({"w": jnp.ones(2, jnp.float32)}, state)
  g = jnp.array([1.0, -2.0], jnp.float64)
  updates, _ = solver.update(g, solver.init(g))
  np.testing.assert_allclose(
      updates, _one_step_reference(g, b2=0.99999999), rtol=1e-8
  )


def test_unknown_convention_lists_the_choices():
  with pytest.raises(ValueError, match="convention must be one of 'pytorch', 'keras', "
                     "'optax', 'paper'; got 'torch'"):
    optax_amsgrad.scale_by_amsgrad(convention="torch")
  with pytest.raises(ValueError, match="Did you mean 'pytorch'"):
    optax_amsgrad.amsgrad(0.1, convention="PyTorch")
  with pytest.raises(ValueError, match="got None"):
    optax_amsgrad.amsgrad(0.1, convention=None)


def test_state_rounding_and_seed():
  with pytest.raises(ValueError, match=r"state_rounding must be one of .*Did you mean "
                     "'nearest'"):
    optax_amsgrad.scale_by_amsgrad(state_rounding="neareast")
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\); got -1"):
    optax_amsgrad.scale_by_amsgrad(seed=-1)
  with pytest.raises(TypeError, match=r"seed must be an integer.*float"):
    optax_amsgrad.scale_by_amsgrad(seed=1.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"mu_dtype": jnp.int32}, TypeError, "mu_dtype must be a floating-point"),
        ({"nu_dtype": "float31"}, TypeError, "nu_dtype must be a dtype"),
        ({"nu_dtype": jnp.float16}, ValueError, "nu_dtype=float16 cannot hold"),
        ({"nu_dtype": jnp.float8_e4m3fn}, ValueError, "nu_dtype=float8_e4m3fn cannot hold"),
    ],
)
def test_storage_dtypes(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    optax_amsgrad.scale_by_amsgrad(**kwargs)


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_traced_hyperparameters_are_not_rejected():
  # Under inject_hyperparams and jit the values are traced: they are not
  # checked (that would cost time in every step) and must not raise.
  solver = optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8
  )
  params = jnp.ones(3)
  state = solver.init(params)

  @jax.jit
  def step(state):
    return solver.update(jnp.array([1.0, -1.0, 0.5]), state, params)

  updates, state = step(state)
  expected = -0.1 * _one_step_reference(np.array([1.0, -1.0, 0.5]))
  np.testing.assert_allclose(updates, expected, rtol=1e-12)


def test_learning_rate_check():
  # The check offered to amsgrad / amsgradw for their learning_rate.
  _validation.check_learning_rate(0.1)
  _validation.check_learning_rate(optax.linear_schedule(0.1, 0.0, 100))
  with pytest.raises(ValueError, match="learning_rate must be finite"):
    _validation.check_learning_rate(float("nan"))
  with pytest.raises(TypeError, match="learning_rate must be a real number, not a string"):
    _validation.check_learning_rate("1e-3")


# ----------------------------------------------------------------------------
# The state and the update call.
# ----------------------------------------------------------------------------


def test_update_without_params_where_they_are_needed():
  solver = optax_amsgrad.amsgradw(0.1)
  params = jnp.ones(3)
  state = solver.init(params)
  with pytest.raises(ValueError, match="not passing `params`"):
    solver.update(jnp.ones(3), state)
  # amsgrad and scale_by_amsgrad do not need them.
  optax_amsgrad.amsgrad(0.1).update(jnp.ones(3), optax_amsgrad.amsgrad(0.1).init(params))


def test_state_from_another_optimizer():
  solver = optax_amsgrad.scale_by_amsgrad()
  params = jnp.ones(3)
  with pytest.raises(TypeError, match=r"expected a ScaleByAmsgradState.*ScaleByAdamState"):
    solver.update(params, optax.scale_by_adam().init(params))


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_state_from_optax_amsgrad_is_explained_and_convertible():
  # optax's own AMSGrad state has the same fields: the message says how to
  # convert it, and the converted state continues optax's run exactly.
  theirs = optax.scale_by_amsgrad()
  ours = optax_amsgrad.scale_by_amsgrad(convention="optax")
  params = jnp.zeros(4)
  rng = np.random.default_rng(3)
  state = theirs.init(params)
  for _ in range(3):
    _, state = theirs.update(jnp.asarray(rng.normal(size=4)), state)
  with pytest.raises(TypeError, match=r"ScaleByAmsgradState\(\*state\) converts it"):
    ours.update(params, state)
  g = jnp.asarray(rng.normal(size=4))
  expected, _ = theirs.update(g, state)
  actual, _ = ours.update(g, optax_amsgrad.ScaleByAmsgradState(*state))
  np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_chain_state_given_to_the_inner_transformation():
  solver = optax_amsgrad.amsgrad(0.1)
  state = solver.init(jnp.ones(3))
  with pytest.raises(TypeError, match=r"got builtins\.tuple.*contains a ScaleByAmsgradState"):
    optax_amsgrad.scale_by_amsgrad().update(jnp.ones(3), state)


def test_inconsistent_state_fields():
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"w": jnp.ones(3)})
  broken = state._replace(nu={"v": jnp.ones(3)})
  with pytest.raises(ValueError, match="mu, nu and nu_max must have one tree structure"):
    solver.update({"w": jnp.ones(3)}, broken)
  with pytest.raises(TypeError, match=r"state\.count must be an integer scalar"):
    solver.update({"w": jnp.ones(3)}, state._replace(count=jnp.zeros(2)))
  with pytest.raises(TypeError, match=r"state\.count must be an integer scalar"):
    solver.update({"w": jnp.ones(3)}, state._replace(count=jnp.float32(0)))


def test_state_fields_of_other_shapes():
  # A nu_max of the wrong shape would broadcast silently into the step.
  solver = optax_amsgrad.scale_by_amsgrad()
  state = solver.init({"w": jnp.ones(3)})
  broken = state._replace(nu_max={"w": jnp.ones(1)})
  with pytest.raises(ValueError, match=r"one shape per leaf, got\n  mu: \{'w': \(3,\)\}\n"
                     r"  nu: \{'w': \(3,\)\}\n  nu_max: \{'w': \(1,\)\}"):
    solver.update({"w": jnp.ones(3)}, broken)
