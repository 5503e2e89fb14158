"""apply_step: the update and apply_updates in one call (one pass on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import CONVENTIONS, max_relative_difference, run_optax

pytestmark = pytest.mark.both_modes

STEP_TARGET = "optax_amsgrad_step"


def run_apply_step(solver, grads, params, *, dtype=None):
  """Params after each step by apply_step, as NumPy arrays."""
  return run_optax(solver, grads, params, dtype=dtype, apply_step=True)


def run_two_calls(solver, grads, params, *, dtype=None):
  """The same trajectory by solver.update and optax.apply_updates."""
  cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
  params = jax.tree.map(cast, params)
  state = solver.init(params)
  step = jax.jit(lambda g, s, p: solver.update(g, s, p))
  out = []
  for g in grads:
    updates, state = step(jax.tree.map(cast, g), state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.map(np.asarray, params))
  return out


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_follows_the_reference_in_float64(convention):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 500, seed=21)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  actual = run_apply_step(optax_amsgrad.amsgrad(1e-2, convention=convention), grads, params)
  assert max_relative_difference(actual, expected) < 1e-12


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_decoupled_weight_decay_and_schedule_follow_the_reference():
  shapes = TREE_SHAPES["deep"]
  grads = spiky_gradients(shapes, 300, seed=22)
  params = initial_params(shapes)
  # A schedule in float64 arithmetic: optax's built-in schedules compute in
  # float32, which would put their own rounding between the two runs.
  def schedule(count):
    return 1e-2 / (1.0 + jnp.asarray(count, jnp.float64) / 50)

  expected = run_reference(
      grads, params, learning_rate=lambda t: 1e-2 / (1.0 + t / 50), weight_decay=0.1
  )
  solver = optax_amsgrad.amsgradw(schedule, weight_decay=0.1)
  assert max_relative_difference(run_apply_step(solver, grads, params), expected) < 1e-12


@pytest.mark.parametrize(
    ("mask", "decayed"),
    [
        (lambda p: {"kernel": True, "bias": False, "scalar": False}, {"kernel"}),
        ({"kernel": False, "bias": True, "scalar": True}, {"bias", "scalar"}),
        (None, {"kernel", "bias", "scalar"}),
    ],
)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_weight_decay_mask_selects_the_leaves(mask, decayed):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 50, seed=23)
  params = initial_params(shapes)
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=0.5, mask=mask)
  actual = run_apply_step(solver, grads, params)
  with_decay = run_reference(grads, params, learning_rate=1e-2, weight_decay=0.5)
  without = run_reference(grads, params, learning_rate=1e-2)
  for name in shapes:
    expected = with_decay if name in decayed else without
    error = max_relative_difference([{name: a[name]} for a in actual],
                                    [{name: e[name]} for e in expected])
    assert error < 1e-12, name


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax_amsgrad.amsgrad(1e-2),
        lambda: optax_amsgrad.amsgrad(optax.cosine_decay_schedule(1e-2, 40)),
        lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=0.0),
        lambda: optax_amsgrad.amsgradw(1e-2, mask=lambda p: {"kernel": True, "bias": False,
                                                            "scalar": True}),
        lambda: optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        lambda: optax_amsgrad.amsgrad(1e-2, convention="optax", nu_dtype=jnp.bfloat16,
                                      state_rounding="nearest"),
        # Not made by amsgrad/amsgradw: the two calls, whatever the solver.
        lambda: optax.inject_hyperparams(optax_amsgrad.amsgrad)(learning_rate=1e-2),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax_amsgrad.amsgrad(1e-2)),
        lambda: optax.adam(1e-2),
    ],
)
def test_float32_matches_update_and_apply_updates(make):
  # One rounding per operation apart at most (XLA fuses some multiply-adds
  # that the one-pass kernel rounds separately), over 40 steps; the state
  # ends up the same tree, with the same step counts.
  solver = make()
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 40, seed=24)
  params = initial_params(shapes)
  fused = run_apply_step(solver, grads, params, dtype=jnp.float32)
  separate = run_two_calls(solver, grads, params, dtype=jnp.float32)
  assert max_relative_difference(fused, separate) < 1e-5
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = solver.init(p32)
  g32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads[0])
  _, fused_state = optax_amsgrad.apply_step(solver, g32, state, p32)
  _, separate_state = solver.update(g32, state, p32)
  assert jax.tree.structure(fused_state) == jax.tree.structure(separate_state)
  for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(separate_state),
                  strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    if jnp.issubdtype(a.dtype, jnp.integer):
      assert int(a) == int(b)


def _compiled(solver, params, donate=True):
  state = solver.init(params)
  step = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p),
                 donate_argnums=(0, 1) if donate else ())
  return step.lower(params, state, params).compile(), state


@pytest.mark.parametrize(
    ("solver", "one_pass"),
    [
        (optax_amsgrad.amsgrad(1e-3), True),
        (optax_amsgrad.amsgradw(1e-3, mask=lambda p: {"w": True}), True),
        (optax_amsgrad.amsgrad(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), True),
        # Wrappers that replace the update function take the two calls.
        (optax.inject_hyperparams(optax_amsgrad.amsgrad)(learning_rate=1e-3), False),
        (optax.chain(optax_amsgrad.amsgrad(1e-3)), False),
    ],
)
def test_one_pass_per_leaf_in_place(solver, one_pass):
  params = {"w": jnp.ones((1000, 1000), jnp.float32)}
  compiled, state = _compiled(solver, params)
  text = compiled.as_text()
  entry = text.split("\nENTRY", 1)[1]
  assert (STEP_TARGET in entry) == one_pass
  if one_pass:
    # Nothing but the handler touches the full-size buffers.
    big_fusions = [line for line in entry.splitlines()
                   if " fusion(" in line and "[1000,1000]" in line.split("=")[1][:40]]
    assert big_fusions == []
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * state_bytes


def _bits(x) -> np.ndarray:
  """The bits of an array, for comparisons that see signed zeros and NaNs."""
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _trees_identical(a, b) -> bool:
  return all(np.array_equal(_bits(x), _bits(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


MIXED_DTYPES = {
    "c": lambda: (jnp.linspace(-1, 2, 6).reshape(3, 2) * (1 + 2j)).astype(jnp.complex64),
    "h": lambda: jnp.linspace(-1, 2, 40).astype(jnp.float16),
    "b": lambda: jnp.linspace(-1, 2, 30).astype(jnp.bfloat16),
    "w": lambda: jnp.linspace(-1, 2, 50).astype(jnp.float32),
}


def _mixed_params(jax_mode):
  params = {name: make() for name, make in MIXED_DTYPES.items()}
  if jax_mode == "x64":
    params["d"] = jnp.linspace(-1, 2, 20, dtype=jnp.float64)
  return params


def _trajectory(solver, params, one_pass, steps=20):
  """Params and state after ``steps`` jitted steps by apply_step, or by
  update and apply_updates in one jitted function."""
  def two_calls(g, s, p):
    updates, s = solver.update(g, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(lambda g, s, p: optax_amsgrad.apply_step(solver, g, s, p)) if one_pass \
      else jax.jit(two_calls)
  state = solver.init(params)
  for t in range(steps):
    grads = jax.tree.map(
        lambda x, t=t: (jnp.sin(x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
                                * (t + 1)) * 3).astype(x.dtype), params)
    params, state = step(grads, state, params)
  return params, state


ANY_SOLVER = {
    "amsgrad": lambda **k: optax_amsgrad.amsgrad(1e-2, **k),
    "amsgradw_schedule": lambda **k: optax_amsgrad.amsgradw(
        optax.cosine_decay_schedule(1e-2, 40), weight_decay=0.1, **k),
    "bfloat16_state": lambda **k: optax_amsgrad.amsgrad(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, **k),
    "flat": lambda **k: optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgradw(1e-2, **k)),
}


@pytest.mark.parametrize("solver", sorted(ANY_SOLVER))
def test_on_the_xla_path_apply_step_is_the_two_calls_bit_for_bit(solver, jax_mode):
  # Every dtype, 20 steps, params and state: the same bits.
  make = ANY_SOLVER[solver]
  params = _mixed_params(jax_mode)
  fused = _trajectory(make(implementation="xla"), params, one_pass=True)
  separate = _trajectory(make(implementation="xla"), params, one_pass=False)
  assert _trees_identical(fused, separate)


@pytest.mark.parametrize("solver", sorted(ANY_SOLVER))
def test_leaves_the_kernel_does_not_cover_get_the_two_calls_bits(solver, jax_mode):
  # float16, bfloat16 and complex params take update's arithmetic in the
  # kernel's pass.
  make = ANY_SOLVER[solver]
  params = {k: v for k, v in _mixed_params(jax_mode).items() if k in ("c", "h", "b")}
  fused = _trajectory(make(implementation="cpu"), params, one_pass=True)
  separate = _trajectory(make(implementation="cpu"), params, one_pass=False)
  assert _trees_identical(fused, separate)


@pytest.mark.parametrize(("solver", "most_ulps"), [("amsgrad", 0), ("amsgradw_schedule", 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_the_kernel_step_equals_the_two_calls_compiled_apart(solver, most_ulps, dtype,
                                                             jax_mode):
  # One step from the same state, over gradients spanning six decades: the
  # kernel rounds as written, as update and apply_updates do when compiled
  # as separate functions.
  if dtype == jnp.float64 and jax_mode == "x32":
    pytest.skip("float64 params need x64")
  make = ANY_SOLVER[solver]
  kernel = make(implementation="cpu")
  rng = np.random.default_rng(5)
  n = 50_000
  p = jnp.asarray(rng.standard_normal(n), dtype)
  state = kernel.init(p)
  for _ in range(4):
    g = jnp.asarray(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3, n), dtype)
    _, state = jax.jit(kernel.update)(g, state, p)
  g = jnp.asarray(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3, n), dtype)
  fused, fused_state = jax.jit(
      lambda g, s, p: optax_amsgrad.apply_step(kernel, g, s, p))(g, state, p)
  updates, separate_state = jax.jit(kernel.update)(g, state, p)
  separate = jax.jit(optax.apply_updates)(p, updates)
  assert _trees_identical(fused_state, separate_state)
  as_int = np.dtype(f"i{np.dtype(dtype).itemsize}")
  ulps = np.abs(np.asarray(fused).view(as_int).astype(np.int64)
                - np.asarray(separate).view(as_int).astype(np.int64))
  assert ulps.max() <= most_ulps


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=0.1),
        lambda: optax_amsgrad.flatten_by_dtype(
            optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
        ),
    ],
)
def test_vmapped_members_equal_separate_runs(make):
  solver = make()
  params = {"w": jnp.linspace(-1, 1, 96, dtype=jnp.float32).reshape(8, 12),
            "b": jnp.zeros(12, jnp.float32)}
  scales = jnp.array([0.5, 1.0, 2.0], jnp.float32)

  def run(scale):
    p, state = params, solver.init(params)
    for t in range(10):
      g = jax.tree.map(lambda x, t=t: scale * jnp.sin(x + t), p)
      p, state = optax_amsgrad.apply_step(solver, g, state, p)
    return p

  batched = jax.jit(jax.vmap(run))(scales)
  for i in range(3):
    single = jax.jit(run)(scales[i])
    for name in params:
      np.testing.assert_array_equal(np.asarray(single[name]),
                                    np.asarray(batched[name][i]))


def test_needs_params():
  solver = optax_amsgrad.amsgrad(1e-2)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="apply_step needs the params"):
    optax_amsgrad.apply_step(solver, params, solver.init(params), None)


FLAT_STEP_TARGET = "optax_amsgrad_flat_step"


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_flat_layout_follows_the_reference_in_float64(convention):
  shapes = TREE_SHAPES["deep"]
  grads = spiky_gradients(shapes, 300, seed=31)
  params = initial_params(shapes)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention,
                           weight_decay=0.1)
  solver = optax_amsgrad.flatten_by_dtype(
      optax_amsgrad.amsgradw(1e-2, weight_decay=0.1, convention=convention)
  )
  assert max_relative_difference(run_apply_step(solver, grads, params), expected) < 1e-12


@pytest.mark.parametrize(
    "options",
    [{}, {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
     {"nu_dtype": jnp.bfloat16, "convention": "optax"}],
)
def test_flat_layout_matches_its_update_path(options):
  # One pass over the leaves and the flat state against flatten_by_dtype's
  # update and apply_updates: the same arithmetic and the same random bits
  # (the flat position of each element), to a rounding per operation.
  solver = optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-2, **options))
  shapes = TREE_SHAPES["deep"]
  grads = spiky_gradients(shapes, 60, seed=32)
  params = initial_params(shapes)
  fused = run_apply_step(solver, grads, params, dtype=jnp.float32)
  separate = run_two_calls(solver, grads, params, dtype=jnp.float32)
  assert max_relative_difference(fused, separate) < 1e-5


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_flat_layout_takes_one_pass_in_place_over_several_dtypes():
  params = {"a": jnp.ones((300, 200), jnp.float32), "b": jnp.ones(100, jnp.float32),
            "c": jnp.ones((50, 4), jnp.float64)}
  solver = optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-3))
  compiled, state = _compiled(solver, params)
  entry = compiled.as_text().split("\nENTRY", 1)[1]
  # One call per dtype, and no full-size XLA kernel: no raveling, no cutting.
  assert entry.count(f'custom_call_target="{FLAT_STEP_TARGET}"') == 2
  assert not [line for line in entry.splitlines()
              if " fusion(" in line and "[60000]" in line]
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * state_bytes
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  new_params, _ = optax_amsgrad.apply_step(solver, grads, state, params)
  for name, x in new_params.items():
    assert x.dtype == params[name].dtype
    np.testing.assert_allclose(np.asarray(x), 1 - 1e-3, rtol=1e-6)


def test_flat_layout_with_a_mask_takes_the_two_calls():
  # A mask inside flatten_by_dtype sees the flat buffers, not the params:
  # apply_step does not guess and takes the wrapper's own update.
  solver = optax_amsgrad.flatten_by_dtype(
      optax_amsgrad.amsgradw(1e-2, mask=lambda p: jax.tree.map(lambda _: True, p))
  )
  params = {"w": jnp.ones(8, jnp.float32)}
  compiled, _ = _compiled(solver, params)
  assert FLAT_STEP_TARGET not in compiled.as_text()
