"""Storing float32 moments in a narrower dtype without biasing the averages.

With ``b2 = 0.999`` the increment ``(1 - b2) * g**2`` is below bfloat16's
resolution relative to ``nu``: rounding to nearest throws it away every step
and the average stalls. Stochastic rounding rounds up with probability equal to
the distance to the lower neighbour, so the stored value is unbiased and the
average keeps moving.

Random bits. They come from a counter-based hash of (seed, step, buffer, leaf,
element index): no key in the state, and they fuse into the update loop, where
a threefry key split per leaf would cost more than the update itself. The
scalar inputs are folded into a per-array key one at a time through a
bijective mixer, so for a fixed element a change of any single input always
changes the bits (no two (seed, step, buffer, leaf) combinations cancel out,
as XOR-ing their multiples could). An element's bits are then
``(index ^ key) * multiplier``, a bijection of the key: exactly uniform for a
uniform key and, with a fresh key every step, independent of everything
before, so every rounding is unbiased given the past. Across the elements of
one array, multiplying by ``2**32`` times a quadratic irrational (the golden
ratio for ``nu``) makes the bits a scrambled Weyl sequence: spread more evenly
than independent draws, so the rounding errors of one step largely cancel over
the elements of a leaf. ``mu`` and ``nu`` (and real and imaginary parts) use
different irrationals, which leaves the decisions of the two buffers as
uncorrelated across elements as independent bits would be. This costs four
integer operations per element against nine for a full mixer.

Bits that are correlated across steps (a per-element random phase advanced by
the golden ratio each step) make rounding errors cancel along an element's
history and track smooth problems more closely, but the correlation leaks into
the decisions: with gradients that repeat with a short period ``nu`` settles
about 2% low. Fresh bits every step avoid that.

The running maximum ``nu_max`` is rounded to nearest, not stochastically.
Rounding to nearest is monotone, so ``round(max(a, b)) == max(a, round(b))``
for a stored ``a``: the stored value is exactly the rounded true running
maximum (of ``v`` and of the stored ``nu``, so that ``nu <= nu_max`` holds in
the state as in float32), never decreasing, and no rounding noise accumulates
in it (no ratchet). A positive value is
never rounded to zero, though: it becomes the smallest positive value instead.
In a dtype of narrow range (float16 flushes ``v < 3e-8``, float8 much more) a
zero maximum would turn the step ``m / (sqrt(v) + eps)`` into ``m / eps``.

Finite values are never stored as infinities: they saturate at the storage
dtype's largest finite value (float16's is 65504, so ``nu = g**2`` overflows
for ``|g| > 256``). An infinite ``nu_max`` would freeze a coordinate for the
rest of training, a saturated one keeps the step bounded. Infinities and NaNs
in the input are stored as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_amsgrad import _dtypes

# Odd multipliers 2**32 * frac(r) for quadratic irrationals r (bounded
# continued-fraction terms, hence evenly spread multiples): the golden ratio
# for nu, the square roots of 3, 2 and 5 for the other streams.
_MULTIPLIERS = {
    ("nu", "real"): 0x9E3779B9,
    ("mu", "real"): 0xBB67AE85,
    ("nu", "imag"): 0x6A09E667,
    ("mu", "imag"): 0x3C6EF373,
}
_BUFFER_CODES = {"mu": 0, "nu": 1}
# How moments narrower than the arithmetic are rounded when stored.
StateRounding = Literal["stochastic", "nearest"]
STATE_ROUNDINGS: tuple[StateRounding, ...] = get_args(StateRounding)

# The real and imaginary parts of a complex moment get separate streams.
_PART_CODES = {"real": 0, "imag": 2}
_SEED_SALT = 0x243F6A88


def mix32(h: jax.Array) -> jax.Array:
  """A bijection on uint32 with full avalanche ("lowbias32", C. Wellons)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def stream_key(
    seed: jax.typing.ArrayLike,
    count: jax.typing.ArrayLike,
    buffer: str,
    leaf_index: int | jax.Array,
    part: str = "real",
) -> jax.Array:
  """One uint32 per (seed, step, buffer, leaf, part), chained through the mixer.

  Each input is folded into the running key with XOR and then mixed, and both
  operations are bijections: for fixed other inputs, distinct values of any one
  input give distinct keys. ``leaf_index`` may be a uint32 array (traced, or
  several leaves at once, broadcasting with ``seed`` and ``count``); stream
  codes wrap modulo ``2**32``.
  """
  position = (jnp.uint32(leaf_index & 0xFFFFFFFF) if isinstance(leaf_index, int)
              else leaf_index.astype(jnp.uint32))
  stream_code = position * jnp.uint32(4) + jnp.uint32(_BUFFER_CODES[buffer] + _PART_CODES[part])
  key = mix32(_as_uint32(seed) ^ jnp.uint32(_SEED_SALT))
  key = mix32(key ^ _as_uint32(count))
  return mix32(key ^ stream_code)


class StreamKeys(NamedTuple):
  """One leaf's stream keys (:func:`stream_key`), one per buffer and part."""

  mu: jax.Array
  nu: jax.Array
  mu_imag: jax.Array
  nu_imag: jax.Array

  def of(self, buffer: str, part: str = "real") -> jax.Array:
    key: jax.Array = getattr(self, buffer if part == "real" else f"{buffer}_imag")
    return key


def stream_keys(
    seed: jax.typing.ArrayLike, count: jax.typing.ArrayLike, leaf_index: int | jax.Array
) -> StreamKeys:
  """The :class:`StreamKeys` of the leaf at ``leaf_index``."""
  return StreamKeys(*(stream_key(seed, count, buffer, leaf_index, part)
                      for part in ("real", "imag") for buffer in ("mu", "nu")))


# Keys per reduce: XLA's passes take time superlinear in a reduce's outputs.
_KEYS_PER_REDUCE = 32


def tree_stream_keys(
    seed: jax.typing.ArrayLike, count: jax.Array, leaf_indices: Sequence[int],
    *, complex_parts: bool,
) -> list[StreamKeys]:
  """The :class:`StreamKeys` of the leaves at ``leaf_indices``, each key a
  separate array computed at run time (the imaginary parts' keys only with
  ``complex_parts``; zeros otherwise).

  Every key is a scalar operand of the leaf's fusion, never a constant folded
  into it: XLA compiles fusions that differ only in a constant separately,
  and identical ones once, so the many same-shaped leaves of a model cost
  one compiled kernel, as they do in ``optax.amsgrad``. The keys of all
  leaves are hashed at once and handed out by :func:`run_time_scalars`.
  """
  positions = jnp.asarray(np.asarray(leaf_indices, np.uint32))
  streams = [("mu", "real"), ("nu", "real")]
  if complex_parts:
    streams += [("mu", "imag"), ("nu", "imag")]
  by_stream = {}
  for buffer, part in streams:
    by_stream[buffer, part] = run_time_scalars(stream_key(seed, count, buffer, positions, part))
  zero = jnp.zeros([], jnp.uint32)
  return [
      StreamKeys(*(by_stream[buffer, part][i] if (buffer, part) in by_stream else zero
                   for part in ("real", "imag") for buffer in ("mu", "nu")))
      for i in range(len(leaf_indices))
  ]


def run_time_scalars(values: jax.Array) -> list[jax.Array]:
  """The elements of the 1-D integer ``values``, each a separate scalar that
  XLA computes at run time rather than a constant it folds into its
  consumers: fusions that differ only in such a scalar compile once.
  Handed out by variadic ``reduce``s (an ``or`` with zero) of a few each: XLA
  fuses a slice into its consumer, with its constant position, but not a
  reduce, and cannot fold this one away."""
  pairs = jnp.stack([values, jnp.zeros_like(values)], axis=1)
  zero = np.zeros((), values.dtype)
  out: list[jax.Array] = []
  for start in range(0, len(values), _KEYS_PER_REDUCE):
    n = min(_KEYS_PER_REDUCE, len(values) - start)
    out.extend(lax.reduce(
        tuple(pairs[start + i] for i in range(n)), tuple(zero for _ in range(n)),
        lambda xs, ys: tuple(x | y for x, y in zip(xs, ys, strict=True)), (0,),
    ))
  return out


def random_bits(
    shape: tuple[int, ...],
    *,
    key: jax.Array,
    buffer: str,
    part: str = "real",
    index: jax.Array | None = None,
) -> jax.Array:
  """Uniform uint32 bits, distinct per element, from the stream ``key``
  (:func:`stream_key` of seed, step, buffer, leaf and part).

  Within one array the bits of distinct elements are distinct (the map from
  the flat index to the bits is a bijection for arrays of up to ``2**32``
  elements), and for one element they are a bijection of the key. The high
  bits are the well-mixed ones. The index is the flat row-major position in
  the global array, so sharded arrays get the same bits as unsharded ones. A
  shard computed on its own (inside ``shard_map`` or a custom partitioning)
  passes its elements' global positions as ``index``.
  """
  if index is None:
    index = lax.iota(jnp.uint32, _size(shape)).reshape(shape)
  bits: jax.Array = (index ^ key) * jnp.uint32(_MULTIPLIERS[buffer, part])
  return bits


def _as_uint32(value: jax.typing.ArrayLike) -> jax.Array:
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.signedinteger):
    # Wraps negative values instead of saturating them.
    value = value.astype(jnp.int32 if value.dtype.itemsize <= 4 else jnp.int64)
  return value.astype(jnp.uint32)


def _size(shape: tuple[int, ...]) -> int:
  size = 1
  for dim in shape:
    size *= dim
  return size


# bfloat16 keeps the high 16 bits of a float32: sign, exponent, 7 bits of
# mantissa. These are float32 bit patterns.
_BF16_BITS = np.uint32(0xFFFF0000)
_BF16_MAX_BITS = np.uint32(0x7F7F0000)  # the largest finite bfloat16
_BF16_SMALLEST_BITS = np.uint32(0x00010000)  # the smallest positive one
_ABS_BITS = np.uint32(0x7FFFFFFF)
_SIGN_BITS = np.uint32(0x80000000)


def _to_bfloat16(x: jax.Array, round_magnitude: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """float32 ``x`` to bfloat16, ``round_magnitude`` choosing the bfloat16
  magnitude from the bits of ``|x|``.

  Integer arithmetic on the bits: the bits of a float are its sign and
  magnitude, and the magnitude's bits are monotone in it across exponents
  and subnormals, so a carry out of the dropped bits lands on the next
  bfloat16 away from zero. Float arithmetic would not do: XLA:CPU flushes
  subnormal operands of float comparisons and clamps to zero. Finite
  magnitudes beyond the largest bfloat16 are first brought down to it (no
  carry reaches the infinity pattern); infinities and NaNs are selected past
  the rounding.
  """
  raw = lax.bitcast_convert_type(x, jnp.uint32)
  magnitude = lax.min(raw & _ABS_BITS, _BF16_MAX_BITS)
  signed = lax.bitcast_convert_type(round_magnitude(magnitude) | (raw & _SIGN_BITS), jnp.float32)
  return lax.select(lax.is_finite(x), signed, x).astype(jnp.bfloat16)


def _stochastic_bfloat16(x: jax.Array, increment: jax.Array) -> jax.Array:
  """float32 ``x`` to bfloat16: ``increment`` (uniform below ``2**16``) added
  to the 16 bits bfloat16 drops, which are then truncated, so the result is
  the neighbour away from zero with probability equal to the dropped
  fraction. The final conversion is exact."""
  return _to_bfloat16(x, lambda magnitude: (magnitude + increment) & _BF16_BITS)


def _nearest_nonzero_bfloat16(x: jax.Array) -> jax.Array:
  """float32 ``x`` to bfloat16 rounded half to even, except that a nonzero
  value never becomes zero: magnitudes below the smallest positive bfloat16
  are raised to it, which the rounding then keeps (it is monotone, and the
  larger magnitudes round to at least that already). The final conversion
  rounds half to even (on the bits: subnormals too)."""
  return _to_bfloat16(x, lambda magnitude: lax.max(
      magnitude, lax.min(magnitude, np.uint32(1)) * _BF16_SMALLEST_BITS))


def _round_generic(
    x: jax.Array,
    dtype: jnp.dtype,
    *,
    mode: Literal["stochastic", "nearest"],
    bits: jax.Array | None = None,
) -> jax.Array:
  """Rounds real ``x`` (float32 or float64) to ``dtype`` by neighbours.

  ``mode="stochastic"`` takes the neighbour on the other side of ``x`` from
  the nearest value with probability ``|x - nearest| / gap``; ``"nearest"``
  rounds to nearest but never turns a nonzero value into zero.
  """
  largest = jnp.asarray(_dtypes.finfo(dtype).max, x.dtype)
  clamped = jnp.clip(x, -largest, largest)
  nearest = clamped.astype(dtype)
  if mode == "nearest":
    smallest = jnp.nextafter(
        jnp.zeros_like(nearest), jnp.where(x > 0, largest, -largest).astype(dtype)
    )
    rounded = jnp.where((nearest == 0) & (clamped != 0), smallest, nearest)
  else:
    assert bits is not None
    error = clamped - nearest.astype(x.dtype)
    # Stepping towards the largest finite value rather than infinity also
    # works for dtypes without an infinity (float8_e4m3fn).
    toward = jnp.where(error > 0, largest, -largest).astype(dtype)
    neighbour = jnp.nextafter(nearest, toward)
    gap = jnp.abs(neighbour.astype(x.dtype) - nearest.astype(x.dtype))
    if x.dtype == jnp.float64:
      uniform = bits.astype(jnp.float64) * 2.0**-32
    else:
      # 24 bits: the exact float32 grid of [0, 1).
      uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    rounded = jnp.where(uniform * gap < jnp.abs(error), neighbour, nearest)
  return jnp.where(jnp.isfinite(x), rounded, x.astype(dtype))


def is_narrowing(compute_dtype: jnp.dtype, storage_dtype: jnp.dtype) -> bool:
  """True when storing in ``storage_dtype`` loses mantissa bits."""
  compute = _dtypes.finfo(compute_dtype)
  storage = _dtypes.finfo(storage_dtype)
  return bool(storage.nmant < compute.nmant)


def _real_parts(x: jax.Array) -> list[tuple[str, jax.Array]]:
  if jnp.iscomplexobj(x):
    return [("real", jnp.real(x)), ("imag", jnp.imag(x))]
  return [("real", x)]


def _from_parts(parts: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  if len(parts) == 1:
    return parts[0]
  return lax.complex(*parts).astype(dtype)


def store(
    x: jax.Array,
    storage_dtype: jax.typing.DTypeLike,
    *,
    stochastic: bool,
    keys: StreamKeys | None,
    buffer: str,
    index: jax.Array | None = None,
) -> jax.Array:
  """Casts a moment ``x`` to ``storage_dtype``, stochastically when narrowing.

  Args:
    x: the moment in the compute dtype (float32, float64 or complex).
    storage_dtype: the dtype the state keeps.
    stochastic: round stochastically when ``storage_dtype`` is narrower;
      otherwise (or when it is not narrower) this is a plain cast.
    keys: the leaf's stream keys for this step (:func:`stream_keys` of the
      seed, the step number after the increment, and the leaf's position in
      the flattened tree), so that every step draws fresh bits.
    buffer: ``"mu"`` or ``"nu"``; the two buffers get independent bits.
    index: the flat row-major position of each element of ``x`` in the whole
      leaf (uint32, shaped like ``x``); by default its position in ``x``.

  Returns:
    ``x`` in ``storage_dtype``. With stochastic rounding the result is one of
    the two representable neighbours of ``x``, the upper one with probability
    equal to the fraction of the gap between them that lies below ``x``, so its
    expectation is ``x``. Finite values beyond the storage range saturate at
    its largest finite value.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_amsgrad import _rounding
    >>> x = jnp.full((10000,), 1.001, jnp.float32)  # 1 < x < 1 + 2**-7
    >>> keys = _rounding.stream_keys(seed=0, count=1, leaf_index=0)
    >>> y = _rounding.store(x, jnp.bfloat16, stochastic=True, keys=keys, buffer="nu")
    >>> sorted(set(y.astype(float).tolist()))
    [1.0, 1.0078125]
    >>> bool(abs(y.astype(jnp.float32).mean() - 1.001) < 2e-4)
    True
  """
  storage_dtype = jnp.dtype(storage_dtype)
  if not (stochastic and is_narrowing(x.dtype, storage_dtype)):
    return x.astype(storage_dtype)
  if keys is None:
    raise ValueError(f"stochastic rounding of {buffer} to {storage_dtype} needs stream keys")
  real_storage = _dtypes.finfo(storage_dtype).dtype
  parts = []
  for part, value in _real_parts(x):
    bits = random_bits(x.shape, key=keys.of(buffer, part), buffer=buffer, part=part,
                       index=index)
    if value.dtype == jnp.float32 and real_storage == jnp.bfloat16:
      parts.append(_stochastic_bfloat16(value, bits >> 16))
    else:
      parts.append(_round_generic(value, real_storage, mode="stochastic", bits=bits))
  return _from_parts(parts, storage_dtype)


def store_max(
    x: jax.Array,
    storage_dtype: jax.typing.DTypeLike,
    *,
    stochastic: bool,
    at_least: jax.Array | None = None,
    scale: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
  """Casts the running maximum ``x`` to ``storage_dtype``.

  Args:
    x: the new running maximum ``max(nu_max, v * scale)`` in the compute dtype.
    storage_dtype: the dtype the state keeps.
    stochastic: the ``state_rounding="stochastic"`` mode, in which the maximum
      itself is rounded to nearest (never stochastically), a nonzero value is
      never rounded to zero, and finite values saturate at the largest finite
      value of ``storage_dtype``. Otherwise, or when ``storage_dtype`` is not
      narrower, this is a plain cast.
    at_least: the ``nu`` just stored (stochastically rounded). The stored
      maximum is kept at or above ``at_least * scale`` (rounded the same way),
      so that it is a running maximum of what is stored, as in float32, even
      when ``nu`` was rounded up past ``x``. Only used with ``stochastic``.
    scale: the factor between ``nu`` and ``nu_max`` (``1 / (1 - b2**t)`` for
      the ``"optax"`` convention, 1 otherwise).

  Returns:
    ``x`` in ``storage_dtype``. The rounding is monotone, so
    ``store_max(max(a, b)) == max(a, store_max(b))`` for a representable
    ``a``: the stored maximum is the rounded true running maximum, never
    decreases and never drifts upwards.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_amsgrad import _rounding
    >>> x = jnp.array([1.001, 1.006, 1e-9, 0.0, 1e6], jnp.float32)
    >>> _rounding.store_max(x, jnp.float16, stochastic=True)
    Array([1.001e+00, 1.006e+00, 5.960e-08, 0.000e+00, 6.550e+04], dtype=float16)
  """
  storage_dtype = jnp.dtype(storage_dtype)
  if not (stochastic and is_narrowing(x.dtype, storage_dtype)):
    return x.astype(storage_dtype)
  if at_least is not None:
    floor = at_least.astype(x.dtype)
    if jnp.iscomplexobj(x):
      scaled = lax.complex(floor.real * scale, floor.imag * scale)
      x = lax.complex(jnp.maximum(x.real, scaled.real),
                      jnp.maximum(x.imag, scaled.imag))
    else:
      x = jnp.maximum(x, floor * scale)
  real_storage = _dtypes.finfo(storage_dtype).dtype
  parts = []
  for _, value in _real_parts(x):
    if value.dtype == jnp.float32 and real_storage == jnp.bfloat16:
      parts.append(_nearest_nonzero_bfloat16(value))
    else:
      parts.append(_round_generic(value, real_storage, mode="nearest"))
  return _from_parts(parts, storage_dtype)
