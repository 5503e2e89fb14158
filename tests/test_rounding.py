"""Storage of the moments in narrow dtypes (optax_amsgrad/_rounding.py).

Expected values come from NumPy (ml_dtypes' bfloat16, float16, float64), not
from the code under test. Statistical checks use a fixed seed, so they are
deterministic; their bounds are derived in ``_assert_unbiased``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax import lax

import optax_amsgrad
from optax_amsgrad import _rounding

from gradients import TREE_SHAPES, initial_params, spiky_gradients
from reference import run_reference
from trajectories import max_relative_difference, run_optax

pytestmark = pytest.mark.both_modes

BF16 = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}
CONVENTIONS = ("pytorch", "keras", "optax", "paper")


# ----------------------------------------------------------------------------
# Helpers: neighbours and rounding computed in NumPy.
# ----------------------------------------------------------------------------


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
  """The representable values of ``dtype`` just below and just above ``x``
  (equal when ``x`` is representable), as float64."""
  x = np.asarray(x, np.float64)
  nearest = x.astype(dtype)
  back = nearest.astype(np.float64)
  largest = np.asarray(ml_dtypes.finfo(dtype).max, dtype)
  up = np.nextafter(nearest, largest).astype(np.float64)
  down = np.nextafter(nearest, -largest).astype(np.float64)
  lower = np.where(back <= x, back, down)
  upper = np.where(back >= x, back, up)
  return lower, upper


def _round_nearest(x: np.ndarray, dtype) -> np.ndarray:
  """NumPy's round-half-to-even cast, as float64 (overflow gives inf)."""
  with np.errstate(over="ignore"):
    return np.asarray(x, np.float64).astype(dtype).astype(np.float64)


def _store(x, dtype, *, count=1, seed=0, buffer="nu", leaf_index=0):
  return _rounding.store(
      x, dtype, stochastic=True, buffer=buffer,
      keys=_rounding.stream_keys(seed, count, leaf_index),
  )


def _as_float64(y: jax.Array) -> np.ndarray:
  # Through NumPy: an XLA conversion could flush subnormals to zero.
  return np.asarray(jax.device_get(y)).astype(np.float64)


def _assert_unbiased(x: float, dtype, samples: np.ndarray):
  """``samples`` are stochastic roundings of ``x``: each must be one of the
  two neighbours, and the fraction rounded up must match the exact
  probability ``p = (x - lower) / (upper - lower)``.

  The fraction of n independent Bernoulli(p) draws has standard deviation
  sqrt(p (1 - p) / n); across the elements of one step the bits are more
  evenly spread than independent draws, which only lowers the spread. We
  allow 6 standard deviations plus 1/n for the discreteness: a biased
  rounding (rounding to nearest, or a probability off by more than that) fails
  it, an unbiased one passes with probability 1 - 2e-9.
  """
  lower, upper = (float(v[0]) for v in _neighbours(np.array([x]), dtype))
  assert np.all((samples == lower) | (samples == upper)), (x, np.unique(samples))
  if lower == upper:
    return
  p = (x - lower) / (upper - lower)
  n = samples.size
  fraction = np.mean(samples == upper)
  bound = 6 * np.sqrt(p * (1 - p) / n) + 1 / n
  assert abs(fraction - p) <= bound, (x, fraction, p, bound)
  # Equivalently, the mean is x to within bound * gap.
  assert abs(samples.mean() - x) <= bound * (upper - lower) + 1e-300


# A spread of float32 values: ordinary ones, values just above and below
# powers of two (where the gap changes), negatives, tiny normals, float32
# subnormals (bfloat16 keeps float32's exponent range, subnormals included)
# and huge values.
FLOAT32_VALUES = [
    1.001, 1.0 + 2**-9, 1.0 + 3 * 2**-10, 1.7, 2.0 - 2**-20, 2.0 + 2**-20,
    -1.001, -3.3e-3, 1e-30, -7.7e-37, 1e-40, -3e-39, 2e-44, 1e38, -2.5e37,
    3.0e38, 0.1,
]


# ----------------------------------------------------------------------------
# Unbiasedness.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("x", FLOAT32_VALUES)
def test_bfloat16_stochastic_rounding_is_unbiased(x):
  x32 = float(np.float32(x))
  # 4096 elements at one step, and one element over 2048 steps.
  across = _store(jnp.full((4096,), x32, jnp.float32), jnp.bfloat16, count=7)
  _assert_unbiased(x32, ml_dtypes.bfloat16, _as_float64(across))
  over_steps = jax.vmap(
      lambda c: _store(jnp.full((3,), x32, jnp.float32), jnp.bfloat16, count=c)
  )(jnp.arange(1, 2049))
  _assert_unbiased(x32, ml_dtypes.bfloat16, _as_float64(over_steps)[:, 1])


@pytest.mark.parametrize("x", [1.001, 1.0 + 2**-12, -0.3, 7e-5, 3e-6, 1e-7, 6e4])
def test_float16_stochastic_rounding_is_unbiased(x):
  # The generic path (neighbours by nextafter), down into float16's
  # subnormals (below 6.1e-5).
  x32 = float(np.float32(x))
  samples = _store(jnp.full((8192,), x32, jnp.float32), jnp.float16, count=3)
  _assert_unbiased(x32, np.float16, _as_float64(samples))


@pytest.mark.parametrize("x", [1.0 + 1e-9, 1 / 3, -2.0**-120 * 1.37, 1e300])
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_float64_to_float32_stochastic_rounding_is_unbiased(x):
  # float64 params with float32 state (x64). Targets stay above float32's
  # subnormals, which XLA's CPU float32 arithmetic flushes to zero anyway.
  with np.errstate(over="ignore"):
    samples = _store(jnp.full((8192,), x, jnp.float64), jnp.float32, count=5)
  largest = float(np.finfo(np.float32).max)
  if abs(x) > largest:
    np.testing.assert_array_equal(_as_float64(samples), largest)
    return
  _assert_unbiased(x, np.float32, _as_float64(samples))


@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_complex128_to_complex64_rounds_both_parts_independently():
  x = 1 / 3 + 1j / 3
  samples = np.asarray(
      _store(jnp.full((8192,), x, jnp.complex128), jnp.complex64, count=2)
  )
  assert samples.dtype == np.complex64
  real = samples.real.astype(np.float64)
  imag = samples.imag.astype(np.float64)
  _assert_unbiased(1 / 3, np.float32, real)
  _assert_unbiased(1 / 3, np.float32, imag)
  # Same value, separate bits: the two decisions are not the same.
  assert np.mean(real == imag) < 0.75


def test_ema_does_not_stall():
  # The failure stochastic rounding exists for: nu = b2 nu + (1 - b2) g**2
  # with b2 = 0.999 never leaves 1.0 when rounded to nearest, because the
  # increment is below half of bfloat16's gap at 1. Stochastic rounding
  # tracks the float64 average (relative error ~ sqrt(gap * drift)).
  b2, target, steps = 0.999, 1.5, 3000

  def ema(nu):
    return b2 * nu.astype(jnp.float32) + (1 - b2) * target

  def step(t, nus):
    nu_nearest, nu_stochastic = nus
    # The step count as the optimizer has it: a traced value.
    return (ema(nu_nearest).astype(jnp.bfloat16),
            _store(ema(nu_stochastic), jnp.bfloat16, count=t))

  ones = jnp.ones(20000, jnp.bfloat16)
  nu_nearest, nu_stochastic = jax.jit(
      lambda nus: lax.fori_loop(1, steps + 1, step, nus))((ones, ones))
  exact = target + (1 - target) * b2**steps
  np.testing.assert_array_equal(_as_float64(nu_nearest), 1.0)
  mean = _as_float64(nu_stochastic).mean()
  assert abs(mean / exact - 1) < 2e-3, (mean, exact)


# ----------------------------------------------------------------------------
# The random bits.
# ----------------------------------------------------------------------------


def _random_bits(shape, *, seed, count, buffer, leaf_index, part="real"):
  key = _rounding.stream_key(seed, count, buffer, leaf_index, part)
  return _rounding.random_bits(shape, key=key, buffer=buffer, part=part)


def _bits(**changes):
  kwargs = {"seed": 0, "count": 1, "buffer": "mu", "leaf_index": 0}
  kwargs.update(changes)
  return np.asarray(_random_bits((64, 1000), **kwargs))


def test_bits_are_distinct_per_element():
  bits = _bits()
  assert bits.dtype == np.uint32
  assert np.unique(bits).size == bits.size


@pytest.mark.parametrize(
    "change",
    [{"count": 2}, {"count": 2**31 - 1}, {"seed": 1}, {"seed": 2**32 - 1},
     {"buffer": "nu"}, {"leaf_index": 1}, {"leaf_index": 12345},
     {"part": "imag"}],
)
@pytest.mark.x64_only  # float64 arithmetic or a float64 reference at round-off
def test_bits_change_for_every_element_when_any_input_changes(change):
  assert np.all(_bits() != _bits(**change))


def test_leaf_index_as_an_array_gives_the_same_keys():
  # The handlers and the jitted XLA path pass leaf positions as uint32
  # arrays (several at once, or traced); the stream codes of Python ints wrap
  # modulo 2**32 the same way.
  leaves = [0, 1, 7, 2**30 - 1, 2**30 + 5, 2**32 - 1]
  for buffer in ("mu", "nu"):
    for part in ("real", "imag"):
      expected = [int(_rounding.stream_key(3, 17, buffer, i, part)) for i in leaves]
      together = _rounding.stream_key(3, 17, buffer, jnp.asarray(leaves, jnp.uint32), part)
      assert np.asarray(together).tolist() == expected
      traced = jax.jit(lambda i, b=buffer, p=part: _rounding.stream_key(3, 17, b, i, p))
      assert [int(traced(jnp.uint32(i))) for i in leaves] == expected
  seeds = jnp.arange(4, dtype=jnp.uint32)[:, None]
  rows = _rounding.stream_key(seeds, 17, "nu", jnp.asarray(leaves, jnp.uint32))
  assert rows.shape == (4, len(leaves))
  assert int(rows[2, 4]) == int(_rounding.stream_key(2, 17, "nu", leaves[4]))


def test_tree_stream_keys_are_each_leafs_keys():
  # The keys handed out to a tree's leaves at run time are the keys of each
  # leaf's position, under jit too (where the handing-out reduce is compiled).
  positions = [0, 1, 2, 5, 40]
  for complex_parts in (False, True):
    for run in (lambda f: f(), lambda f: jax.jit(f)()):
      given = run(lambda cp=complex_parts: _rounding.tree_stream_keys(
          jnp.uint32(3), jnp.int32(17), positions, complex_parts=cp))
      for position, keys in zip(positions, given, strict=True):
        expected = _rounding.stream_keys(3, 17, position)
        for stream in ("mu", "nu") + (("mu_imag", "nu_imag") if complex_parts else ()):
          assert int(getattr(keys, stream)) == int(getattr(expected, stream))


def test_bits_do_not_cancel_between_inputs():
  # With a key built by XOR-ing multiples of the inputs, some (seed, count)
  # pairs would give the same bits as other pairs; folding the inputs in
  # through a mixer one by one keeps them apart.
  seed, count, leaf = np.meshgrid(np.arange(8), np.arange(1, 65), np.arange(4), indexing="ij")
  keys = {buffer: np.asarray(_rounding.stream_key(seed, count, buffer,
                                                  jnp.asarray(leaf, jnp.uint32)))
          for buffer in ("mu", "nu")}
  assert np.unique(np.concatenate([k.ravel() for k in keys.values()])).size == 8 * 64 * 2 * 4
  # A leaf's position given as a Python int is the same stream.
  assert int(_rounding.stream_key(3, 5, "nu", 2)) == keys["nu"][3, 4, 2]


def test_high_bits_are_uniform_across_elements_and_steps():
  # Chi-square test of the top 8 bits (the ones the rounding compares most
  # closely): 255 degrees of freedom, mean 255, sd 22.6; 400 is 6.4 sd out.
  for bits in (_bits().ravel(),
               np.asarray(jax.vmap(lambda c: _random_bits(
                   (4,), seed=0, count=c, buffer="nu", leaf_index=3))(
                       jnp.arange(1, 20001)))[:, 2]):
    counts = np.bincount(bits >> 24, minlength=256)
    expected = bits.size / 256
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 400, chi2


def _decisions_over_steps(**kwargs):
  """Rounding decisions (up or not) of two elements of a fair-coin value,
  over 20000 steps."""
  x = jnp.full((2,), 1.0 + 2**-8, jnp.float32)  # halfway: each draw is a coin
  kwargs = {"seed": 0, "buffer": "mu", "leaf_index": 0, **kwargs}
  stored = jax.vmap(lambda c: _store(x, jnp.bfloat16, count=c, **kwargs))(
      jnp.arange(1, 20001))
  return _as_float64(stored) > 1.0 + 2**-8


def test_decisions_of_one_element_are_independent():
  # For one element, the decisions of mu and nu, of two leaves and of two
  # seeds are uncorrelated over steps, and so are consecutive steps: each
  # step's bits are fresh. (Neighbouring elements of one array are not
  # independent of each other: their bits are spread evenly on purpose.)
  # Correlations of n independent coins have sd 1/sqrt(n); 6 sd allowed.
  bound = 6 / np.sqrt(20000)
  mu = _decisions_over_steps()
  assert abs(mu.mean() - 0.5) < bound
  for other in (_decisions_over_steps(buffer="nu"),
                _decisions_over_steps(leaf_index=1),
                _decisions_over_steps(seed=1)):
    for k in (0, 1):
      assert abs(np.corrcoef(mu[:, k], other[:, k])[0, 1]) < bound
  for k in (0, 1):
    assert abs(np.corrcoef(mu[:-1, k], mu[1:, k])[0, 1]) < bound


def test_mu_and_nu_decisions_are_uncorrelated_across_elements():
  # Within one step the bits of a leaf are evenly spread (a scrambled Weyl
  # sequence); mu and nu use different multipliers so that their decisions
  # are no more correlated across the elements than independent coins.
  x = jnp.full((50000,), 1.0 + 2**-8, jnp.float32)
  bound = 6 / np.sqrt(x.size)
  for count in (1, 2, 1000):
    mu, nu = (_as_float64(_store(x, jnp.bfloat16, count=count, buffer=b))
              > 1.0 + 2**-8 for b in ("mu", "nu"))
    assert abs(mu.mean() - 0.5) < bound and abs(nu.mean() - 0.5) < bound
    assert abs(np.corrcoef(mu, nu)[0, 1]) < bound


# ----------------------------------------------------------------------------
# nu_max: monotone, the rounded true maximum, no ratchet.
# ----------------------------------------------------------------------------


def _scan_states(solver, grads, params):
  """The state after every step (float32 gradients, one lax.scan)."""

  @jax.jit
  def run(grads):
    def step(state, g):
      _, state = solver.update(g, state, params)
      return state, state

    return jax.lax.scan(step, solver.init(params), grads)[1]

  return jax.device_get(run(grads))


@pytest.mark.parametrize("convention", ["pytorch", "optax"])
def test_nu_max_is_the_rounded_running_maximum(convention):
  # Spiky gradients (rare 100x spikes), then a quiet phase: nu_max never
  # decreases, holds at least every stored nu, equals the nearest bfloat16 of
  # the running maximum of v and the stored nu (v recomputed here in float64
  # from the stored nu), and does not move at all once v stays below it.
  b2 = 0.999
  rng = np.random.default_rng(0)
  g = rng.normal(size=(1500, 256)).astype(np.float32)
  g[rng.random(g.shape) < 0.01] *= 100
  g[1000:] *= 0.01
  params = jnp.zeros(256, jnp.float32)
  solver = optax_amsgrad.scale_by_amsgrad(b2=b2, convention=convention, **BF16)
  states = _scan_states(solver, jnp.asarray(g), params)
  nu = np.asarray(states.nu).astype(np.float64)
  nu_max = np.asarray(states.nu_max).astype(np.float64)

  assert np.all(np.diff(nu_max, axis=0) >= 0)
  t = np.arange(1, len(g) + 1)[:, None]
  scale = 1 / (1 - b2**t) if convention == "optax" else np.ones_like(t, float)
  previous = np.vstack([np.zeros((1, 256)), nu[:-1]])
  v = (b2 * previous + (1 - b2) * g.astype(np.float64) ** 2) * scale
  # The maximum of v and of the stored nu (rounded up past v at times).
  running = np.maximum.accumulate(np.maximum(v, nu * scale), axis=0)
  # float32 arithmetic differs from float64 by a few float32 ulps: bracket.
  low = _round_nearest(running * (1 - 1e-6), ml_dtypes.bfloat16)
  high = _round_nearest(running * (1 + 1e-6), ml_dtypes.bfloat16)
  assert np.all((low <= nu_max) & (nu_max <= high))
  if convention == "pytorch":
    assert np.all(nu <= nu_max)
  # The quiet phase: v decays below the maximum, which stays exactly put.
  quiet = nu_max[1100:]
  np.testing.assert_array_equal(quiet, np.broadcast_to(quiet[0], quiet.shape))


def test_nu_max_with_constant_gradients_stops_at_one_neighbour_of_the_limit():
  # v -> g**2. The stored nu stays between the two bfloat16 neighbours of
  # g**2 (rounding never overshoots them), so nu_max can never exceed the
  # upper neighbour: no step-after-step ratchet. It ends on one of them
  # (the upper one once the stored nu has visited it).
  g = np.float32(1.1) * np.exp(np.linspace(-20, 20, 512)).astype(np.float32)
  solver = optax_amsgrad.scale_by_amsgrad(b2=0.99, **BF16)
  grads = jnp.broadcast_to(jnp.asarray(g), (2000, g.size))
  states = _scan_states(solver, grads, jnp.zeros(g.size, jnp.float32))
  nu_max = np.asarray(states.nu_max).astype(np.float64)
  lower, upper = _neighbours(g.astype(np.float64) ** 2, ml_dtypes.bfloat16)
  assert np.all(np.diff(nu_max, axis=0) >= 0)
  assert np.all(nu_max <= upper)
  assert np.all((nu_max[-1] == lower) | (nu_max[-1] == upper))


def test_nu_max_rounds_to_nearest_and_never_to_zero():
  x = np.array([1.001, 1.006, 3e-8, 1e-9, 0.0, 1e6, 1.0 + 2**-8], np.float32)
  stored = _as_float64(_rounding.store_max(jnp.asarray(x), jnp.float16,
                                           stochastic=True))
  expected = _round_nearest(x, np.float16)
  expected[3] = float(np.nextafter(np.float16(0), np.float16(1)))  # not 0
  expected[5] = float(np.finfo(np.float16).max)  # saturated, not inf
  np.testing.assert_array_equal(stored, expected)
  stored = _as_float64(_rounding.store_max(jnp.asarray(x), jnp.bfloat16,
                                           stochastic=True))
  np.testing.assert_array_equal(stored, _round_nearest(x, ml_dtypes.bfloat16))
  # float32 subnormals below half the smallest bfloat16 (9.2e-41) round to
  # nearest as zero; the maximum keeps the smallest one, with its sign.
  tiny = np.array([1e-45, 4e-41, -4e-41, 7e-41], np.float32)
  smallest = float(np.nextafter(ml_dtypes.bfloat16(0), ml_dtypes.bfloat16(1)))
  stored = _as_float64(_rounding.store_max(jnp.asarray(tiny), jnp.bfloat16,
                                           stochastic=True))
  np.testing.assert_array_equal(stored, [smallest, smallest, -smallest, smallest])
  # The plain-cast mode is a plain cast.
  plain = _as_float64(_rounding.store_max(jnp.asarray(x), jnp.float16,
                                          stochastic=False))
  np.testing.assert_array_equal(plain, _round_nearest(x, np.float16))


# ----------------------------------------------------------------------------
# Special values.
# ----------------------------------------------------------------------------

BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


@pytest.mark.parametrize("which", ["store", "store_max"])
def test_special_values_in_bfloat16(which):
  x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, -3.4e38,
                BF16_MAX, -BF16_MAX, 1.5, -1.5], np.float32)
  if which == "store":
    y = _store(jnp.asarray(x), jnp.bfloat16)
  else:
    y = _rounding.store_max(jnp.asarray(x), jnp.bfloat16, stochastic=True)
  y = _as_float64(y)
  assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])
  assert y[3] == 0 and not np.signbit(y[3])
  assert y[4] == 0 and np.signbit(y[4])
  # Finite values beyond bfloat16's range saturate rather than become inf.
  np.testing.assert_array_equal(y[5:9], [BF16_MAX, -BF16_MAX, BF16_MAX, -BF16_MAX])
  np.testing.assert_array_equal(y[9:], [1.5, -1.5])  # representable: exact


def test_nan_with_low_payload_stays_nan():
  # A NaN whose payload sits only in the 16 bits bfloat16 drops.
  x = np.array([0x7F800001, 0xFF800001], np.uint32).view(np.float32)
  for y in (_store(jnp.asarray(x), jnp.bfloat16),
            _rounding.store_max(jnp.asarray(x), jnp.bfloat16, stochastic=True)):
    assert np.all(np.isnan(_as_float64(y)))


def test_special_values_in_float16():
  x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e5, -1e5, 1e-9, 65504.0],
               np.float32)
  y = _as_float64(_store(jnp.asarray(x), jnp.float16))
  assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])
  assert y[3] == 0 and not np.signbit(y[3]) and y[4] == 0 and np.signbit(y[4])
  np.testing.assert_array_equal(y[5:7], [65504.0, -65504.0])
  tiny = float(np.nextafter(np.float16(0), np.float16(1)))
  assert y[7] in (0.0, tiny)
  assert y[8] == 65504.0


def test_float32_subnormals_round_to_bfloat16_subnormals():
  # Integer arithmetic on the bit pattern is immune to flush-to-zero.
  x = np.float32(1e-40)
  lower, upper = _neighbours(np.array([x], np.float64), ml_dtypes.bfloat16)
  assert 0 < lower[0] < upper[0] < np.finfo(np.float32).tiny
  y = _as_float64(_store(jnp.full((4096,), x, jnp.float32), jnp.bfloat16))
  _assert_unbiased(float(x), ml_dtypes.bfloat16, y)


def _float32_bit_patterns() -> np.ndarray:
  """Random float32 bit patterns of every kind, the subnormals up past the
  smallest bfloat16, the largest bfloat16 and the values beyond it, and the
  special values, each with both signs."""
  rng = np.random.default_rng(0)
  bits = np.concatenate([
      rng.integers(0, 2**31, 100_000, dtype=np.uint32),
      np.arange(0x30000, dtype=np.uint32),
      np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x7F7F0000, 0x7F7F7FFF,
                0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x7F800001], np.uint32),
  ])
  return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


def _assert_same_bfloat16(y: jax.Array, expected: np.ndarray, x: np.ndarray):
  got = np.asarray(jax.device_get(y))
  nan = np.isnan(x)
  assert np.all(np.isnan(got[nan].astype(np.float64)))
  wrong = np.flatnonzero(got[~nan].view(np.uint16) != expected[~nan].view(np.uint16))
  assert wrong.size == 0, [(float(x[~nan][i]), float(got[~nan][i]), float(expected[~nan][i]))
                           for i in wrong[:5]]


def test_bfloat16_roundings_bit_for_bit_against_numpy():
  # Every kind of float32, with random increments: the stochastic rounding
  # takes the neighbour away from zero exactly when the increment reaches
  # the part of the gap below |x| (in units of 2**-16 of the gap); the
  # maximum's rounding is NumPy's half-to-even cast, nonzero kept nonzero;
  # finite values beyond the largest bfloat16 saturate.
  x = _float32_bit_patterns()
  increment = np.random.default_rng(1).integers(0, 2**16, x.size, dtype=np.uint32)
  largest = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
  smallest = float(np.nextafter(ml_dtypes.bfloat16(0), ml_dtypes.bfloat16(1)))
  finite = np.isfinite(x)
  x64 = np.where(finite, x, 0.0).astype(np.float64)
  saturated = np.abs(x64) > largest
  lower, upper = _neighbours(np.clip(x64, -largest, largest), ml_dtypes.bfloat16)
  toward_zero = np.where(x64 > 0, lower, upper)
  away = np.where(x64 > 0, upper, lower)
  gap = np.abs(away - toward_zero)
  below = np.round(np.abs(x64 - toward_zero) / np.where(gap > 0, gap, 1) * 2**16)
  stochastic = np.where(increment + below >= 2**16, away, toward_zero)
  stochastic = np.where(saturated, np.sign(x64) * largest, stochastic)
  stochastic = np.where(finite, stochastic, x).astype(ml_dtypes.bfloat16)
  _assert_same_bfloat16(
      jax.jit(_rounding._stochastic_bfloat16)(jnp.asarray(x), jnp.asarray(increment)),
      stochastic, x)

  with np.errstate(over="ignore"):
    nearest = x64.astype(ml_dtypes.bfloat16).astype(np.float64)
  nearest = np.where(saturated, np.sign(x64) * largest, nearest)
  nearest = np.where(finite & (nearest == 0) & (x64 != 0), np.sign(x64) * smallest, nearest)
  nearest = np.where(finite, nearest, x).astype(ml_dtypes.bfloat16)
  _assert_same_bfloat16(
      jax.jit(_rounding._nearest_nonzero_bfloat16)(jnp.asarray(x)), nearest, x)


# ----------------------------------------------------------------------------
# Through the optimizer.
# ----------------------------------------------------------------------------


def test_bfloat16_state_takes_six_bytes_per_parameter():
  params = {"w": jnp.zeros((100, 30)), "b": jnp.zeros(30), "s": jnp.zeros(())}
  size = sum(x.size for x in jax.tree.leaves(params))
  for solver in (optax_amsgrad.scale_by_amsgrad(**BF16),
                 optax_amsgrad.amsgrad(1e-3, **BF16),
                 optax_amsgrad.amsgradw(1e-3, **BF16)):
    state = solver.init(params)
    stored = sum(
        x.nbytes for x in jax.tree.leaves(state) if x.shape == () or x.size > 1
        if x.dtype == jnp.bfloat16
    )
    assert stored / size == 6
    assert all(x.dtype != jnp.float32 or x.size == 1
               for x in jax.tree.leaves(state) if x.dtype != jnp.int32)


def _bf16_run(solver, steps=30, seed=0):
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, steps, seed=seed)
  params = initial_params(shapes)
  return grads, params, run_optax(solver, grads, params, dtype=jnp.float32)


def test_jit_and_eager_draw_the_same_bits():
  # The bits are a function of (seed, step, leaf, index): jit or not, the
  # stored state is the same. (Fused float32 arithmetic may differ by an ulp
  # in the update; the rounding of the moments is what must agree.)
  solver = optax_amsgrad.scale_by_amsgrad(**BF16, seed=3)
  params = {"w": jnp.linspace(-1, 1, 37, dtype=jnp.float32)}
  g = {"w": jnp.sin(jnp.arange(37, dtype=jnp.float32)) * 3}
  state = solver.init(params)
  for _ in range(3):
    eager_updates, eager = solver.update(g, state)
    jit_updates, jitted = jax.jit(solver.update)(g, state)
    chex.assert_trees_all_equal(eager, jitted)
    np.testing.assert_allclose(eager_updates["w"], jit_updates["w"], rtol=1e-6)
    state = eager


def test_vmap_equals_separate_runs():
  solver = optax_amsgrad.scale_by_amsgrad(**BF16)
  rng = np.random.default_rng(1)
  grads = jnp.asarray(rng.normal(size=(4, 3, 50)), jnp.float32)  # (steps, batch, n)
  params = jnp.zeros((3, 50), jnp.float32)

  def run(params, grads):
    state = solver.init(params)
    for g in grads:
      updates, state = solver.update(g, state)
    return updates, state

  batched = jax.vmap(run, in_axes=(0, 1))(params, grads)
  for k in range(3):
    single = run(params[k], grads[:, k])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
      np.testing.assert_array_equal(np.asarray(a)[k] if a.ndim else a, np.asarray(b))


def test_inject_hyperparams_keeps_the_rounding():
  injected = optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=1e-2, **BF16, seed=5
  )
  plain = optax_amsgrad.amsgrad(1e-2, **BF16, seed=5)
  _, _, a = _bf16_run(injected)
  _, _, b = _bf16_run(plain)
  # Same rounding draws; the injected learning rate is a float32 array, so
  # the two runs agree to float32 round-off, not bit for bit.
  assert max_relative_difference(a, b) < 1e-5
  state = injected.init({"w": jnp.zeros(3)})
  assert optax.tree.get(state, "nu_max")["w"].dtype == jnp.bfloat16


def test_seed_changes_the_trajectory_slightly():
  _, _, a = _bf16_run(optax_amsgrad.amsgrad(1e-2, **BF16, seed=0))
  _, _, b = _bf16_run(optax_amsgrad.amsgrad(1e-2, **BF16, seed=1))
  # Different rounding draws, same trajectory to bfloat16's noise.
  assert 0 < max_relative_difference(a, b) < 1e-2


def test_state_round_trips_through_bytes_and_continues_identically():
  # The bits depend on (seed, step) only: a restored state continues exactly
  # as an uninterrupted run.
  solver = optax_amsgrad.scale_by_amsgrad(**BF16)
  rng = np.random.default_rng(4)
  grads = [jnp.asarray(rng.normal(size=20), jnp.float32) for _ in range(12)]
  state = solver.init(jnp.zeros(20))
  for g in grads[:6]:
    _, state = solver.update(g, state)

  def roundtrip(x):
    x = np.asarray(x)
    return jnp.asarray(np.frombuffer(x.tobytes(), x.dtype).reshape(x.shape))

  restored = jax.tree.map(roundtrip, state)
  for g in grads[6:]:
    u1, state = solver.update(g, state)
    u2, restored = solver.update(g, restored)
    np.testing.assert_array_equal(np.asarray(u1), np.asarray(u2))
  chex.assert_trees_all_equal(state, restored)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("state_rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("state_dtype", [None, jnp.float32])
def test_float32_state_is_untouched(convention, state_rounding, state_dtype):
  # With float32 storage nothing is rounded: the float32 trajectory follows
  # the float64 reference to float32 round-off, and both modes agree exactly.
  shapes = TREE_SHAPES["mixed"]
  grads = spiky_gradients(shapes, 40, seed=3)
  params = initial_params(shapes)
  solver = optax_amsgrad.amsgrad(
      1e-2, convention=convention, mu_dtype=state_dtype, nu_dtype=state_dtype,
      state_rounding=state_rounding, seed=11,
  )
  actual = run_optax(solver, grads, params, dtype=jnp.float32)
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  assert max_relative_difference(actual, expected) < 1e-5
  baseline = run_optax(
      optax_amsgrad.amsgrad(1e-2, convention=convention), grads, params,
      dtype=jnp.float32,
  )
  assert max_relative_difference(actual, baseline) == 0.0


@pytest.mark.parametrize("convention", ["pytorch", "keras", "optax"])
def test_bfloat16_state_follows_the_reference_to_its_precision(convention):
  # Stochastic rounding keeps the trajectory of the float64 reference to
  # bfloat16's resolution (2**-8 relative per stored moment). The "paper"
  # convention is left out: without bias correction its first steps are
  # ~30x larger and amplify any perturbation (its float32 run is already 25x
  # further from the reference than the others').
  shapes = TREE_SHAPES["deep"]
  grads = spiky_gradients(shapes, 60, seed=5)
  params = initial_params(shapes)
  actual = run_optax(
      optax_amsgrad.amsgrad(1e-2, convention=convention, **BF16), grads, params,
      dtype=jnp.float32,
  )
  expected = run_reference(grads, params, learning_rate=1e-2, convention=convention)
  assert max_relative_difference(actual, expected) < 5e-3


def test_vmapped_ensemble_members_get_their_own_streams_from_injected_seeds():
  # A static seed is shared by every member of a vmapped ensemble; injecting
  # it gives each member its own rounding stream, and equal seeds equal bits.
  solver = optax.inject_hyperparams(
      optax_amsgrad.amsgrad, static_args=("b1", "b2", "eps", "eps_root")
  )(learning_rate=1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, seed=0)

  def init(params, seed):
    state = solver.init(params)
    return state._replace(hyperparams={**state.hyperparams, "seed": seed})

  params = jnp.stack([jnp.linspace(-1.0, 1.0, 1000)] * 3)
  grads = jnp.stack([jnp.sin(jnp.arange(1000.0) / 7.0)] * 3)
  states = jax.vmap(init)(params, jnp.array([0, 1, 0]))
  _, states = jax.jit(jax.vmap(solver.update))(grads, states, params)
  mu = np.asarray(optax.tree.get(states, "mu").astype(jnp.float32))
  assert np.any(mu[0] != mu[1])
  np.testing.assert_array_equal(mu[0], mu[2])
