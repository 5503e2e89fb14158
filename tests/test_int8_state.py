"""Blockwise 8-bit state (``mu_dtype="int8"``, ``nu_dtype="int8"``).

The format against a float64 NumPy model of the codes (every value a code
stands for, listed from its definition, and rounding by search in that list),
AMSGrad's guarantee over a hostile gradient stream (``nu_max`` never decreases,
is never 0 where the float32 run's is positive), isolation of non-finite
values, and the rest of the library around it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad
from optax_amsgrad import _blockwise, _transform
from optax_amsgrad.cpu import _rules

INT8 = {"mu_dtype": "int8", "nu_dtype": "int8"}


# --- a NumPy model of the codes -------------------------------------------


def np_values(code: _blockwise.Code, s: int) -> np.ndarray:
  """float64 magnitudes of the finite magnitude codes 0, 1, ... at scale 2**s:
  below the lowest binade, multiples of its spacing; then binades of 2**M
  evenly spaced values each, the top one starting at 2**s."""
  m, top = code.mantissa_bits, 2**code.exponent_bits - 1
  spacing = 2.0 ** (1 - top + s - m)
  values = [j * spacing for j in range(2**m)]
  for binade in range(1, top + 1):
    start = 2.0 ** (binade - top + s)
    values += [start * (1 + j / 2**m) for j in range(2**m)]
  return np.array(values[: code.max_magnitude + 1])


def np_exponent(block: np.ndarray, code: _blockwise.Code) -> int:
  """The smallest scale exponent whose largest code holds the block's largest
  finite magnitude (at least the floor)."""
  finite = np.abs(block[np.isfinite(block)]).astype(np.float64)
  largest = finite.max() if finite.size else 0.0
  s = _blockwise.MIN_EXPONENT
  if largest > 0:
    s = max(s, int(np.floor(np.log2(largest))) - 2)
  while largest > np_values(code, s)[-1]:
    s += 1
  return s


def np_round(x: np.ndarray, s: np.ndarray, code: _blockwise.Code, mode: str) -> np.ndarray:
  """``x`` rounded to the codes at per-element exponents ``s`` (float64);
  NaN where ``x`` is not finite."""
  out = np.empty(x.shape, np.float64)
  for i, (value, exponent) in enumerate(zip(x.ravel(), s.ravel(), strict=True)):
    if not np.isfinite(value):
      out.flat[i] = np.nan
      continue
    table = np_values(code, int(exponent))
    magnitude = abs(float(value))
    j = int(np.searchsorted(table, magnitude, side="left"))  # table[j] >= magnitude
    if mode == "up" or table[j] == magnitude:
      r = table[j]
    else:
      lo, hi = table[j - 1], table[j]
      if magnitude - lo != hi - magnitude:
        r = lo if magnitude - lo < hi - magnitude else hi
      else:  # a tie: to the even code
        r = lo if (j - 1) % 2 == 0 else hi
    out.flat[i] = -r if value < 0 else r
  return out


def np_block_exponents(x: np.ndarray, code: _blockwise.Code) -> np.ndarray:
  n = x.shape[-1]
  blocks = -(-n // _blockwise.BLOCK)
  return np.array([
      [np_exponent(row[b * _blockwise.BLOCK:(b + 1) * _blockwise.BLOCK], code)
       for b in range(blocks)] for row in x.reshape(-1, n)
  ]).reshape(*x.shape[:-1], blocks)


def _per_element(exponents: np.ndarray, n: int) -> np.ndarray:
  return np.repeat(exponents, _blockwise.BLOCK, axis=-1)[..., :n]


def _hostile_values(rng: np.random.Generator, shape: tuple[int, ...], signed: bool) -> np.ndarray:
  """Magnitudes over 10 decades, with zeros, exact codes' neighbours, ties and
  specials."""
  x = 10.0 ** rng.uniform(-9, 1, size=shape)
  if signed:
    x *= rng.choice([-1.0, 1.0], size=shape)
  x = x.astype(np.float32)
  flat = x.reshape(-1)
  flat[rng.choice(flat.size, 20, replace=False)] = 0.0
  flat[:4] = [1.0, 1.03125, 1.0625 + 2**-5, 3.0]  # codes, and a tie at scale 0
  flat[7] = np.float32(1e-40)  # a float32 subnormal
  return x


@pytest.mark.parametrize("buffer", ["mu", "nu"])
@pytest.mark.parametrize("mode", ["up", "nearest"])
def test_quantize_matches_numpy_model(buffer, mode):
  code = _blockwise.CODES[buffer]
  x = _hostile_values(np.random.default_rng(0), (3, 700), signed=code.signed)
  if mode == "up" and code.signed:
    x = np.abs(x)
  q, value = _blockwise.quantize(jnp.asarray(x), code, mode=mode)
  exponents = np_block_exponents(x, code)
  np.testing.assert_array_equal(np.asarray(q.exponents), exponents)
  expected = np_round(x.astype(np.float64), _per_element(exponents, x.shape[-1]), code, mode)
  decoded = np.asarray(_blockwise.decode(q, code), np.float64)
  np.testing.assert_array_equal(decoded, expected)
  np.testing.assert_array_equal(np.asarray(value, np.float64), expected)
  if mode == "up":
    assert np.all(decoded >= x) and np.all(decoded[x > 0] > 0)


@pytest.mark.parametrize("buffer", ["mu", "nu"])
def test_decode_every_code_at_every_scale(buffer):
  code = _blockwise.CODES[buffer]
  scales = np.array([_blockwise.MIN_EXPONENT, -60, -1, 0, 5, 100, 126], np.int8)
  assert np_values(code, _blockwise.MIN_EXPONENT)[1] >= np.finfo(np.float32).tiny
  codes = np.arange(256, dtype=np.uint8)
  q = _blockwise.Quantized(
      jnp.asarray(np.broadcast_to(codes, (len(scales), 256))), jnp.asarray(scales[:, None]))
  decoded = np.asarray(_blockwise.decode(q, code), np.float64)
  for row, s in zip(decoded, scales, strict=True):
    table = np_values(code, int(s))
    if code.signed:
      np.testing.assert_array_equal(row[:128], table)
      np.testing.assert_array_equal(row[129:], -table[1:])
      assert np.isnan(row[0x80])
    else:
      np.testing.assert_array_equal(row[:255], table)
      assert np.isnan(row[255])


@pytest.mark.parametrize("buffer", ["mu", "nu"])
def test_stochastic_rounding_is_unbiased_between_neighbours(buffer):
  code = _blockwise.CODES[buffer]
  rng = np.random.default_rng(1)
  x = _hostile_values(rng, (2, 512), signed=code.signed)
  s = _per_element(np_block_exponents(x, code), 512)
  lo, hi = np.empty(x.shape), np.empty(x.shape)
  for i, (value, exponent) in enumerate(zip(np.abs(x).ravel(), s.ravel(), strict=True)):
    table = np_values(code, int(exponent))
    lo.flat[i] = table[np.searchsorted(table, value, side="right") - 1]
    hi.flat[i] = table[np.searchsorted(table, value, side="left")]
  draws = []
  for seed in range(200):
    bits = jnp.asarray(np.random.default_rng(seed).integers(0, 2**32, x.shape, np.uint32))
    q, value = _blockwise.quantize(jnp.asarray(x), code, mode="stochastic", bits=bits)
    decoded = np.asarray(_blockwise.decode(q, code), np.float64)
    np.testing.assert_array_equal(decoded, np.asarray(value, np.float64))
    magnitude = np.abs(decoded)
    assert np.all((magnitude == lo) | (magnitude == hi))
    assert np.all(np.sign(decoded) * np.sign(x) >= 0)
    draws.append(decoded)
  draws = np.array(draws)
  # Unbiased: the number of draws rounded up is within 5 standard deviations
  # (and one draw, for tiny probabilities) of its binomial mean.
  gap = hi - lo
  p = np.where(gap > 0, (np.abs(x) - lo) / np.where(gap > 0, gap, 1), 0)
  ups = np.sum(np.abs(draws) == hi[None], axis=0) * (gap > 0)
  n = len(draws)
  assert np.all(np.abs(ups - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1)
  # And over all elements, the mean error relative to the gap is unbiased.
  relative = ((np.abs(draws) - np.abs(x)) / np.where(gap > 0, gap, 1))[:, gap > 0]
  assert abs(relative.mean()) < 5 * relative.std() / np.sqrt(relative.size)


def test_a_larger_scale_moves_nu_max_codes_exactly_or_rounds_them_up():
  """``nu_max``'s old codes under a scale ``shift`` binades larger: the
  NumPy model's old value rounded up at the new scale, for every code."""
  code = _blockwise.NU_CODE
  codes = np.arange(256, dtype=np.uint8)
  for old_exponent in (_blockwise.MIN_EXPONENT, -3, 60):
    old_values = np.append(np_values(code, old_exponent), np.nan)
    for shift in range(0, 40):
      new_exponent = old_exponent + shift
      if new_exponent > 126:
        break
      kept = _blockwise._rescaled_up(
          jnp.asarray(codes), jnp.full(codes.shape, shift, jnp.int32), code)
      decoded = np.asarray(_blockwise.decode(
          _blockwise.Quantized(kept[None], jnp.full((1, 1), new_exponent, jnp.int8)), code),
          np.float64)[0]
      expected = np_round(old_values, np.full(256, new_exponent), code, "up")
      np.testing.assert_array_equal(decoded, expected, err_msg=f"{old_exponent=} {shift=}")
      assert np.all(decoded[1:255] > 0)


# --- AMSGrad's guarantee ----------------------------------------------------


def _hostile_stream(steps: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  """Gradients whose scale swings 100x every 25 steps, with spikes of 1e3 on
  random elements, and per-element magnitudes spanning three decades (six in
  g**2) inside every block."""
  rng = np.random.default_rng(seed)
  base = 10.0 ** rng.uniform(-3, 0, size=shape)
  grads = np.empty((steps, *shape), np.float32)
  for t in range(steps):
    swing = 10.0 if (t // 25) % 2 == 0 else 0.1
    g = swing * base * rng.normal(size=shape)
    spikes = rng.random(shape) < 0.002
    g[spikes] *= 1e3
    grads[t] = g
  return grads


def _run(solver, grads, params):
  state = solver.init(params)
  update = jax.jit(solver.update)
  decode = jax.jit(optax_amsgrad.decode_state)
  states = []
  for g in grads:
    _, state = update({"w": jnp.asarray(g)}, state)
    states.append(decode(state))
  return states


def _nearest_under_fresh_scales(nu_max_before: np.ndarray, v: np.ndarray) -> np.ndarray:
  """The running maximum as 8-bit Adam libraries keep their moments: rounded
  to nearest under each step's fresh block scales."""
  new = np.maximum(nu_max_before, v)
  return np.asarray(_stored_to_nearest(jnp.asarray(new, jnp.float32)))


@jax.jit
def _stored_to_nearest(x: jax.Array) -> jax.Array:
  return _blockwise.quantize(x, _blockwise.NU_CODE, mode="nearest")[1]


# The XLA path (what GPUs and TPUs run) and the CPU kernel (the default on CPU).
IMPLEMENTATIONS = ["xla", "cpu"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("convention", ["pytorch", "optax"])
def test_nu_max_never_decreases_nor_vanishes_over_a_hostile_stream(convention, implementation):
  shape = (4, 1024)
  grads = _hostile_stream(300, shape)
  params = {"w": jnp.zeros(shape, jnp.float32)}
  int8 = _run(optax_amsgrad.scale_by_amsgrad(convention=convention, **INT8,
                                             implementation=implementation), grads, params)
  f32 = _run(optax_amsgrad.scale_by_amsgrad(convention=convention), grads, params)
  previous = np.zeros(shape, np.float32)
  control = np.zeros(shape, np.float32)
  decreases = zeros = control_decreases = control_zeros = 0
  for state, reference in zip(int8, f32, strict=True):
    nu_max = np.asarray(state.nu_max["w"])
    nu = np.asarray(state.nu["w"])
    true_max = np.asarray(reference.nu_max["w"])
    decreases += int(np.sum(nu_max < previous))
    zeros += int(np.sum((nu_max == 0) & (true_max > 0)))
    scale = nu_max / np.maximum(true_max, 1e-38)
    assert np.all(nu >= 0) and np.all(np.isfinite(nu_max))
    previous = nu_max
    # The same stream through round-to-nearest under fresh scales.
    v = np.asarray(reference.nu_max["w"])
    new_control = _nearest_under_fresh_scales(control, v)
    control_decreases += int(np.sum(new_control < control))
    control_zeros += int(np.sum((new_control == 0) & (v > 0)))
    control = new_control
  assert decreases == 0
  assert zeros == 0
  # The stream is hostile: the libraries' rounding fails on it.
  assert control_decreases > 100 and control_zeros > 100
  # And the 8-bit maximum stays close to the float32 one at the end, although
  # half the elements end below 1e-6 of their block's largest (measured:
  # median 1.06, 90th percentile 1.32; 4.1 and 3e3 with an E4M4 code).
  assert 0.95 < np.median(scale) < 1.1
  assert np.percentile(scale, 90) < 1.5


def _nan_runs(value, implementation):
  shape = (8, 512)
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(12, *shape)).astype(np.float32)
  grads[:, 1, 3] *= 1e-2  # never the largest of its block
  poisoned = grads.copy()
  poisoned[5:, 1, 3] = value
  solver = optax_amsgrad.amsgrad(1e-3, **INT8, implementation=implementation)
  params = {"w": jnp.zeros(shape, jnp.float32)}
  assert _blockwise.is_quantized(solver.init(params)[0].mu["w"])
  step = jax.jit(lambda g, s, p: optax_amsgrad.apply_step(solver, g, s, p))
  out = []
  for stream in (grads, poisoned):
    state, p = solver.init(params), params
    for g in stream:
      p, state = step({"w": jnp.asarray(g)}, state, p)
    out.append((p, state))
  return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_element_leaves_its_block_alone(value, implementation):
  (p_clean, clean), (p_bad, bad) = _nan_runs(value, implementation)
  other = np.ones((8, 512), bool)
  other[1, 3] = False
  for field in ("mu", "nu", "nu_max"):
    q_clean, q_bad = getattr(clean[0], field)["w"], getattr(bad[0], field)["w"]
    np.testing.assert_array_equal(np.asarray(q_clean.exponents), np.asarray(q_bad.exponents))
    np.testing.assert_array_equal(np.asarray(q_clean.codes)[other], np.asarray(q_bad.codes)[other])
    decoded = np.asarray(_blockwise.decoded(q_bad, "mu" if field == "mu" else "nu"))
    assert np.isnan(decoded[1, 3])
  np.testing.assert_array_equal(np.asarray(p_clean["w"])[other], np.asarray(p_bad["w"])[other])
  assert not np.isfinite(np.asarray(p_bad["w"])[1, 3])


# --- against the float64 reference ------------------------------------------


def test_first_steps_within_code_resolution_of_float64_reference():
  from tests.reference import ReferenceAmsgrad

  rng = np.random.default_rng(4)
  shape = (8, 512)
  solver = optax_amsgrad.scale_by_amsgrad(**INT8)
  state = solver.init({"w": jnp.zeros(shape, jnp.float32)})
  reference = ReferenceAmsgrad(shape)
  mu_bound = np.zeros(shape)
  for t in range(1, 4):
    g = (rng.choice([-1, 1], shape) * rng.uniform(0.5, 2.0, shape)).astype(np.float32)
    u, state = solver.update({"w": jnp.asarray(g)}, state)
    reference.step(g)
    decoded = optax_amsgrad.decode_state(state)
    # nu_max rounded to nearest (half a code step, 1/16), and moved by the
    # stochastic rounding of the nu it came from (a code step, 1/8).
    ratio = np.asarray(decoded.nu_max["w"], np.float64) / reference.v_max
    assert np.all(ratio >= 1 - 2**-2) and np.all(ratio <= 1 + 2**-2)
    # Each stochastic rounding of mu moves it by less than a code step, at
    # most 1/8 of its magnitude; earlier errors decay with b1.
    mu_bound = 0.9 * (1 + 2**-3) * mu_bound + 2**-3 * np.abs(reference.m) + 1e-6
    assert np.all(np.abs(np.asarray(decoded.mu["w"]) - reference.m) <= mu_bound)
    # The update is the one of the decoded state, which decode_state returns.
    mu, nu_max = (np.asarray(x, np.float64) for x in (decoded.mu["w"], decoded.nu_max["w"]))
    expected = (mu / (1 - 0.9**t)) / (np.sqrt(nu_max / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=1e-5)


# --- the library around it -------------------------------------------------


def test_options_layout_and_mixed_storage():
  params = {"w": jnp.zeros((64, 256), jnp.float32), "b": jnp.zeros(256, jnp.float32),
            "k": jnp.zeros((5000, 8), jnp.float32)}
  for mu_dtype, nu_dtype in [("int8", "int8"), (jnp.int8, jnp.bfloat16), (None, jnp.int8)]:
    solver = optax_amsgrad.amsgradw(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    state = solver.init(params)[0]
    assert _blockwise.is_quantized(state.mu["w"]) == (mu_dtype is not None)
    nu_int8 = nu_dtype is not None and jnp.dtype(nu_dtype) == jnp.int8
    assert _blockwise.is_quantized(state.nu["w"]) == nu_int8
    assert _blockwise.is_quantized(state.nu_max["w"]) == nu_int8
    if mu_dtype is not None:
      assert state.mu["w"].codes.dtype == jnp.uint8 and state.mu["w"].codes.shape == (64, 256)
      assert state.mu["w"].exponents.dtype == jnp.int8
      assert state.mu["w"].exponents.shape == (64, 1)
      # Too small a leaf, or too short a row: float32.
      assert state.mu["b"].dtype == jnp.float32
      assert state.mu["k"].dtype == jnp.float32
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    _, new = solver.update(grads, solver.init(params), params)
    decoded = optax_amsgrad.decode_state(new)[0]
    for field in ("mu", "nu", "nu_max"):
      for name, p in params.items():
        leaf = getattr(decoded, field)[name]
        assert leaf.shape == p.shape and leaf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(decoded.mu["w"]), 0.1, rtol=2**-3)


def test_a_state_of_another_storage_is_refused():
  params = {"w": jnp.zeros((64, 256), jnp.float32)}
  grads = {"w": jnp.ones((64, 256), jnp.float32)}
  int8, plain = optax_amsgrad.amsgrad(1e-3, **INT8), optax_amsgrad.amsgrad(1e-3)
  with pytest.raises(TypeError, match=r"mu at \['w'\] is an array of float32.*mu_dtype=int8"):
    int8.update(grads, plain.init(params))
  with pytest.raises(TypeError, match=r"mu at \['w'\] is 8-bit blocks"):
    plain.update(grads, int8.init(params))
  state = int8.init(params)
  with pytest.raises(ValueError, match="mu, nu and nu_max must have one"):
    int8.update(grads, (state[0]._replace(nu={"v": state[0].nu["w"]}), state[1]))
  wrong = state[0].mu["w"]._replace(exponents=state[0].mu["w"].exponents[:, :0])
  with pytest.raises(TypeError, match=r"with exponents of shape \(64, 1\), not \(64, 0\)"):
    int8.update(grads, (state[0]._replace(mu={"w": wrong}), state[1]))


def test_int8_refused_for_other_integer_dtypes():
  with pytest.raises(TypeError, match="'int8' for blockwise 8-bit storage; got int16"):
    optax_amsgrad.amsgrad(1e-3, nu_dtype=jnp.int16)


def test_jit_compiles_once_and_apply_step_matches_two_calls():
  params = {"w": jnp.ones((64, 512), jnp.float32), "b": jnp.zeros(512, jnp.float32)}
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, **INT8)
  one_pass = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p),
                     donate_argnums=(0, 1))

  @jax.jit
  def two_calls(p, s, g):
    updates, s = solver.update(g, s, p)
    return optax.apply_updates(p, updates), s

  p1, s1 = jax.tree.map(jnp.copy, params), solver.init(params)
  p2, s2 = params, solver.init(params)
  rng = np.random.default_rng(5)
  for _ in range(5):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    p1, s1 = one_pass(p1, s1, g)
    p2, s2 = two_calls(p2, s2, g)
  assert one_pass._cache_size() == 1  # type: ignore[attr-defined]
  assert _blockwise.is_quantized(s1[0].mu["w"]) and not _blockwise.is_quantized(s1[0].mu["b"])
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One rounding per operation apart (XLA may fuse a multiply and an add).
  for name in params:
    np.testing.assert_allclose(np.asarray(p1[name]), np.asarray(p2[name]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("call", "stack_elements", "stacks"), [
    ("update", None, [3]), ("apply_step", None, [3]),
    # A stack holds at most GROUP_ELEMENTS: 3 leaves of 8,192 in stacks of 2
    # (the third is stepped alone).
    ("apply_step", 2 * 8192 + 1, [2]),
])
def test_small_alike_leaves_stepped_as_one_stack_get_their_own_bits(
    monkeypatch, call, stack_elements, stacks):
  """Small 8-bit leaves of one shape are stepped as one stack (one compile
  for all of them); each gets the bits it gets stepped alone: its own random
  bits, its own NaN, its own scales."""
  if stack_elements is not None:
    monkeypatch.setattr(_transform, "GROUP_ELEMENTS", stack_elements)
  rng = np.random.default_rng(3)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(16, 512)), jnp.float32) for i in range(3)}
  params["b"] = jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)
  grads = []
  for t in range(6):
    g = {k: jnp.asarray(rng.normal(size=x.shape) * 10.0 ** rng.uniform(-3, 3, size=x.shape),
                        jnp.float32) for k, x in params.items()}
    if t == 2:
      g["w1"] = g["w1"].at[3, 7].set(jnp.nan)
    grads.append(g)
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, **INT8, implementation="xla")
  groups = []
  recorded = _transform._small_8bit_groups
  monkeypatch.setattr(_transform, "_small_8bit_groups",
                      lambda leaves: groups.append(recorded(leaves)) or groups[-1])

  def run():
    update = jax.jit(solver.update)
    apply = jax.jit(lambda g, s, p: optax_amsgrad.apply_step(solver, g, s, p))
    params_t, state = params, solver.init(params)
    out = []
    for g in grads:
      if call == "update":
        u, state = update(g, state, params_t)
        out.append(u)
      else:
        params_t, state = apply(g, state, params_t)
        out.append(params_t)
    return jax.tree.leaves((out, state))

  stacked = run()
  assert [len(group) for group in groups[-1]] == stacks
  monkeypatch.setattr(_transform, "GROUPED_LEAF_SIZE", 0)
  jax.clear_caches()
  alone = run()
  assert groups[-1] == []
  assert len(stacked) == len(alone)
  for x, y in zip(stacked, alone, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cpu_kernel_takes_8_bit_leaves_when_all_three_buffers_are():
  q = _blockwise.zeros(jnp.zeros((64, 256), jnp.uint8), "nu")
  g = jnp.zeros((64, 256), jnp.float32)
  assert _rules.kernel_signature(g, q, q, q, g) is not None
  assert _rules.kernel_signature(g, q, q, q) is not None
  # Mixed storage, and params other than float32, are stepped by XLA.
  assert _rules.kernel_signature(g, g, q, q, g) is None
  assert _rules.kernel_signature(g, q, g, g, g) is None
  assert _rules.kernel_signature(g, q, q, q, g.astype(jnp.bfloat16)) is None
  assert _rules.kernel_signature(g.astype(jnp.bfloat16), q, q, q) is None


def test_inject_hyperparams():
  params = {"w": jnp.ones((64, 256), jnp.float32)}
  solver = optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=1e-2, mu_dtype="int8", nu_dtype=jnp.int8)
  state = solver.init(params)
  assert _blockwise.is_quantized(state.inner_state[0].mu["w"])
  step = jax.jit(solver.update)
  for _ in range(3):
    updates, state = step({"w": jnp.ones((64, 256), jnp.float32)}, state, params)
  # The first steps of AMSGrad with a constant gradient: -lr * sign(g), up to
  # the rounding of mu (1/8) and nu_max (1/8, 1/16 in its square root).
  np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2, rtol=0.2)
  assert step._cache_size() == 1  # type: ignore[attr-defined]
  decoded = optax_amsgrad.decode_state(state)
  assert optax.tree.get(decoded, "nu_max")["w"].dtype == jnp.float32


def test_flatten_by_dtype():
  params = {"w": jnp.ones((64, 128), jnp.float32), "b": jnp.zeros(32, jnp.float32)}
  solver = optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-2, **INT8))
  state = solver.init(params)
  nu_max = optax.tree.get(state, "nu_max")["float32"]
  assert _blockwise.is_quantized(nu_max) and nu_max.codes.shape == (64 * 128 + 32,)
  step = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p))
  grads = {"w": jnp.full((64, 128), 2.0, jnp.float32), "b": jnp.full(32, -1.0, jnp.float32)}
  p = params
  for _ in range(3):
    p, state = step(p, state, grads)
  # Three steps of -lr * sign(g), each within 20% (the rounding of mu and
  # nu_max, as in test_inject_hyperparams).
  np.testing.assert_allclose(np.asarray(p["w"]), 1 - 3e-2, rtol=0, atol=3 * 0.2 * 1e-2)
  np.testing.assert_allclose(np.asarray(p["b"]), 3e-2, rtol=0, atol=3 * 0.2 * 1e-2)
  assert np.std(np.asarray(p["w"])) > 0  # rounded stochastically: not all alike
  decoded = optax.tree.get(optax_amsgrad.decode_state(state), "nu_max")["float32"]
  assert decoded.shape == (64 * 128 + 32,) and decoded.dtype == jnp.float32


def test_bytes_per_parameter():
  # A model of 4.2M params: two matrices and their biases.
  params = {"w1": jnp.zeros((1024, 2048), jnp.float32), "b1": jnp.zeros(2048, jnp.float32),
            "w2": jnp.zeros((2048, 1024), jnp.float32), "b2": jnp.zeros(1024, jnp.float32)}
  n = sum(p.size for p in jax.tree.leaves(params))
  state = optax_amsgrad.amsgrad(1e-3, **INT8).init(params)
  per_param = sum(x.nbytes for x in jax.tree.leaves(state)) / n
  assert 3.0 < per_param <= 3.1
  f32 = optax_amsgrad.amsgrad(1e-3).init(params)
  assert sum(x.nbytes for x in jax.tree.leaves(f32)) / n > 12


def test_donated_step_keeps_no_float32_temporary_of_the_params():
  params = {"w": jnp.ones((1024, 1024), jnp.float32)}
  solver = optax_amsgrad.amsgrad(1e-3, **INT8)
  state = solver.init(params)
  assert _blockwise.is_quantized(state[0].nu_max["w"])
  step = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p),
                 donate_argnums=(0, 1))
  compiled = step.lower(params, state, params).compile()
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries < 4 * params["w"].size


def test_eight_devices_shard_the_scales_with_no_collective(tmp_path):
  from scale_out.launch import run_script

  run_script("int8_devices.py", [str(tmp_path)], host_devices=8, timeout=300)
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["devices"] == 8 and report["quantized"]
  # Codes and exponents sharded as their param, rows or columns, on 8 devices.
  for case, (codes, exponents, shards) in report["placement"].items():
    expected = "P('x', None)" if case.endswith("rows") else "P(None, 'x')"
    assert (codes, exponents, shards) == (expected, expected, 8), case
  assert report["collectives"] == []
  assert report["same_as_single_device"]
  assert report["compiles"] == 1


def test_export_for_accelerators_has_no_custom_call():
  params = {"w": jax.ShapeDtypeStruct((64, 512), jnp.float32)}
  solver = optax_amsgrad.amsgrad(1e-3, **INT8)
  state = jax.eval_shape(solver.init, params)
  step = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p))
  for platform in ("cuda", "rocm", "tpu"):
    exported = jax.export.export(step, platforms=[platform])(params, state, params)
    assert "stablehlo.custom_call" not in exported.mlir_module(), platform


def test_checkpoint_manager_resumes_bit_for_bit(tmp_path):
  from optax_amsgrad import checkpoint

  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, **INT8)
  rng = np.random.default_rng(6)
  initial = {"w": rng.normal(size=(32, 256)).astype(np.float32),
             "b": np.zeros(256, np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()}
           for _ in range(8)]
  step = jax.jit(lambda p, s, g: optax_amsgrad.apply_step(solver, g, s, p),
                 donate_argnums=(0, 1))

  def run(params, state, start):
    for g in grads[start:]:
      params, state = step(params, state, g)
    return jax.tree.map(np.array, (params, state))

  params = jax.tree.map(jnp.asarray, initial)
  state = solver.init(params)
  with checkpoint.Manager(tmp_path, save_interval_steps=4) as manager:
    for t, g in enumerate(grads[:4]):
      params, state = step(params, state, g)
      manager.save(t + 1, {"params": params, "opt_state": state})
  assert _blockwise.is_quantized(state[0].nu_max["w"])
  uninterrupted = run(params, state, 4)

  fresh = jax.tree.map(jnp.asarray, initial)
  with checkpoint.Manager(tmp_path, save_interval_steps=4) as manager:
    restored = manager.restore(manager.latest_step(),
                               {"params": fresh, "opt_state": solver.init(fresh)})
  resumed = run(restored["params"], restored["opt_state"], 4)
  leaves = jax.tree.leaves(resumed)
  assert len(leaves) == len(jax.tree.leaves(uninterrupted))
  for a, b in zip(leaves, jax.tree.leaves(uninterrupted), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
