"""Blockwise 8-bit storage of the moments (``mu_dtype="int8"``/``nu_dtype="int8"``).

A stored leaf is a :class:`Quantized`: one uint8 code per element, shaped like
the params, and one int8 power-of-two scale exponent ``s`` per block of
:data:`BLOCK` consecutive elements along the last axis (blocks stay within a
row, so the exponents are shaped like the leaf with the last axis divided by
the block, rounded up, and shard with it: no collective in the step).

The codes are small floats relative to the block's scale ``2**s``, decoded and
rounded with integer arithmetic on the bits of float32 values (no ``exp2``, no
256-entry gather, see :func:`_values`): a magnitude code ``c`` with ``E`` exponent
and ``M`` mantissa bits has field ``e = c >> M`` and ``f = c & (2**M - 1)``, and
stands for ``(f + 2**M [e > 0]) * 2**(max(e, 1) - (2**E - 1) + s - M)``. The
top binade ``e = 2**E - 1`` covers ``[2**s, 2**(s + 1))``; ``e = 0`` continues
the lowest binade's spacing down to zero (subnormals). Read as integers, the
codes are in the order of the values they stand for, so rounding carries from
one binade to the next by itself.

- ``nu`` and ``nu_max`` (non-negative): E5M3, 31 binades (9.3 decades) at
  a relative spacing of at most 1/8 below the block's largest value, and 3
  more of subnormals. Code 255 is NaN.
- ``mu`` (signed): a sign bit and an E4M3 magnitude, 15 binades (4.5
  decades, the square root of nu's range) at 1/8. The code of negative
  zero, 0x80, is NaN.

Why not a dynamic map (Dettmers et al. 2022): decoding it is a gather from a
256-entry table per element, which XLA turns into a loop on CPU and a
scattered read on accelerators, and a round-up or stochastic rounding to it
needs a search; the float-like code rounds with the same integer arithmetic
as a float and decodes exactly, and its resolution relative to a value does
not depend on the block's scale.

Why E5M3 for the second moment: it spans the square of the gradients'
range, and a running maximum in a block keeps its largest value for good
(one spike sets the block's scale for the rest of training). Over the
hostile stream of the tests (six decades of ``g**2`` inside a block, scale
swings of 100x, spikes of 1e3), half the elements end below 1e-6 of their
block's maximum: E4M4 (4.5 decades, spacing 1/16) rounds them up to its
smallest code, a median 4x too large ``nu_max`` (steps 2x too short), where
E5M3 keeps the median within 6% of the float32 run's (p90 1.32). E4M4 is
better only near the top of the block (2% against 4%).

The rounding of each buffer:

- ``mu`` and ``nu``: a fresh scale from the block's largest finite new
  value each step, and stochastic (unbiased) rounding: with ``b2 = 0.999`` the
  increment of ``nu`` is far below a code step.
- ``nu_max``: the scale exponent is the larger of the stored one and the one
  the new values need, so it never decreases; the new maximum (of the
  decoded old one and the new ``v``) is rounded to nearest, a positive value
  never to zero, and never below the old value's code rounded up to the new
  scale. With an unchanged scale an old value is a code, which rounding to
  nearest keeps (rounding is monotone, and the maximum is at least that
  code); under a larger scale its code shifts exactly (or, in the subnormal
  range, rounds up). So the ``nu_max`` the step uses never decreases and is
  never 0 where the float32 one is positive.

  Rounding it up instead (an upper bound of the float32 maximum) biases
  every step down by about half a code step, 3% in ``sqrt(nu_max)``, and it
  shows: with every leaf in 8 bits, the final loss of the least-squares and
  digits problems of ``benchmarks/state_precision.py`` (3/10 of the budget,
  two seeds) ended 4-10% above float32 state's, against 0.2-0.4% when
  rounded to nearest. Rounding to nearest does not ratchet: a value that
  rounds back to the stored code leaves it.
- A non-finite value is stored as NaN (its element's own code only) and never
  sets its block's scale.

Scales have a floor, :data:`MIN_EXPONENT`, at which the smallest code is still
a normal float32 (XLA:CPU flushes subnormals): values below ``2**-123``
(1e-37) are rounded at that spacing, ``nu_max`` up to it.

Leaves of fewer than :data:`MIN_SIZE` elements, or whose last axis is shorter
than :data:`MIN_ROW`, and complex or float64 leaves keep their state in the
compute dtype (float32): they are few parameters, and their scales would cost
more than the codes save.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_amsgrad import _rounding

BLOCK = 256
"""Elements per block, along the last axis."""
MIN_SIZE = 4096
"""Leaves with fewer elements keep float32 state."""
MIN_ROW = 32
"""Leaves whose last axis is shorter keep float32 state."""
MIN_EXPONENT = -90
"""The smallest block scale exponent."""
_MAX_EXPONENT = 127
MAX_ROUNDING = "nearest"
"""How ``nu_max`` is rounded: ``"nearest"`` (monotone, never to zero) or
``"up"``, kept for measurement: see the module's docstring."""

INT8 = np.dtype(np.int8)


class Code(NamedTuple):
  """An 8-bit float-like code relative to a block scale."""

  exponent_bits: int
  mantissa_bits: int
  signed: bool

  @property
  def top(self) -> int:
    """The exponent field of the binade ``[2**s, 2**(s + 1))``."""
    return (1 << self.exponent_bits) - 1

  @property
  def nan(self) -> int:
    return 0x80 if self.signed else 0xFF

  @property
  def max_magnitude(self) -> int:
    """The largest finite magnitude code."""
    return 0x7F if self.signed else 0xFE

  def magnitude_value(self, c: int, s: int = 0) -> float:
    """What magnitude code ``c`` stands for at scale ``2**s`` (host floats)."""
    e, f = c >> self.mantissa_bits, c & ((1 << self.mantissa_bits) - 1)
    significand = f + ((1 << self.mantissa_bits) if e > 0 else 0)
    return float(significand * 2.0 ** (max(e, 1) - self.top + s - self.mantissa_bits))


MU_CODE = Code(4, 3, signed=True)
NU_CODE = Code(5, 3, signed=False)
CODES = {"mu": MU_CODE, "nu": NU_CODE}


class Quantized(NamedTuple):
  """One leaf of a moment in blockwise 8-bit storage.

  Attributes:
    codes: uint8, shaped like the param.
    exponents: int8 block scale exponents, shaped like the param with the last
      axis ``n`` replaced by ``ceil(n / BLOCK)``.
  """

  codes: jax.Array
  exponents: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)


def is_quantized(x: Any) -> bool:
  return isinstance(x, Quantized)


def is_int8(dtype: Any) -> bool:
  """Whether a resolved ``mu_dtype``/``nu_dtype`` selects 8-bit storage."""
  return dtype is not None and jnp.dtype(dtype) == INT8


def eligible(shape: tuple[int, ...], param_dtype: Any) -> bool:
  """Whether a leaf of this shape and dtype is stored in 8 bits when asked."""
  size = int(np.prod(shape, dtype=np.int64)) if shape else 1
  return (
      len(shape) >= 1 and size >= MIN_SIZE and shape[-1] >= MIN_ROW
      and jnp.issubdtype(param_dtype, jnp.floating)
      and jnp.promote_types(param_dtype, jnp.float32) == jnp.float32
  )


def exponents_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (*shape[:-1], -(-shape[-1] // BLOCK))


def zeros(codes: jax.Array, buffer: str) -> Quantized:
  """A zero moment around ``codes`` (uint8 zeros placed like the param). The
  scales start at the floor, so that ``nu_max``'s only grow."""
  del buffer
  shape = exponents_shape(tuple(codes.shape))
  # The exponents derive from the codes by the step's own reduction, so they
  # are placed (sharded) as the step returns them.
  exponents = fresh_exponents(codes.astype(jnp.float32), NU_CODE).astype(jnp.int8)
  assert exponents.shape == shape
  return Quantized(codes, exponents)


def view(tree: Any) -> Any:
  """``tree`` with each :class:`Quantized` replaced by a float32
  ``ShapeDtypeStruct`` of its shape: for checks of structure and shape."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # type: ignore[no-untyped-call]
      if is_quantized(x) else x,
      tree, is_leaf=is_quantized,
  )


# float32 bit fields.
_EXPONENT_SHIFT = 23
_MANTISSA_MASK = np.uint32(0x7FFFFF)
_ABS_MASK = np.uint32(0x7FFFFFFF)
_ONE_BINADE = np.int32(1 << _EXPONENT_SHIFT)


def _pow2(k: jax.Array) -> jax.Array:
  """``2.0**k`` in float32 for integer ``k`` in [-126, 127], from its bits."""
  return lax.bitcast_convert_type(
      ((k + 127).astype(jnp.uint32) << _EXPONENT_SHIFT), jnp.float32)


def _binade(magnitude_bits: jax.Array) -> jax.Array:
  """``floor(log2 x)`` (int32) from the bits of ``|x|``; -127 for zero and
  subnormals."""
  return (magnitude_bits >> _EXPONENT_SHIFT).astype(jnp.int32) - 127


def _needed_exponent(x: jax.Array, code: Code) -> jax.Array:
  """The smallest scale exponent (int32) at which ``x`` rounds, in any
  direction, to a finite code: its binade, or the next one when ``|x|`` is
  above the largest code of that binade. :data:`MIN_EXPONENT` for
  non-finite values and zero."""
  bits = lax.bitcast_convert_type(x, jnp.uint32) & _ABS_MASK
  top = code.magnitude_value(code.max_magnitude)  # in [1, 2)
  threshold = round((top - 1.0) * 2**23)
  # Adding the mantissa's headroom above the top code carries into the
  # exponent field exactly when the mantissa is above it.
  needed = _binade(bits + np.uint32(0x7FFFFF - threshold))
  needed = lax.select(lax.is_finite(x), needed, jnp.full_like(needed, MIN_EXPONENT))
  return lax.clamp(jnp.int32(MIN_EXPONENT), needed, jnp.int32(_MAX_EXPONENT))


def _per_element(exponents: jax.Array, n: int) -> jax.Array:
  """Block exponents (int32) broadcast to the elements of a last axis of
  ``n``."""
  blocks = exponents.shape[-1]
  wide = jnp.broadcast_to(exponents[..., None], (*exponents.shape, BLOCK))
  return wide.reshape(*exponents.shape[:-1], blocks * BLOCK)[..., :n]


# The codes are decoded and rounded on the bits of float32 values. A normal
# magnitude code c (e > 0) shifted left by 23 - M is the float32 bits of its
# value at scale 2**(top - 127 - s), so adding ``_offset(s)`` (the bits of
# 2**(s - top) with no mantissa) gives the bits of its value, and subtracting
# it from the bits of |x| gives c with the rounded-off bits below it. A
# subnormal code (e = 0, the first 2**M) is the same with one binade added,
# less the value of that binade's start.


def _offset(s: jax.Array, code: Code) -> jax.Array:
  return (s + (127 - code.top)) << _EXPONENT_SHIFT


def _values(c: jax.Array, s: jax.Array, code: Code) -> jax.Array:
  """The float32 values of codes ``c`` (int32) at per-element scale exponents
  ``s`` (int32), exactly."""
  shift = _EXPONENT_SHIFT - code.mantissa_bits
  magnitude = c & 0x7F if code.signed else c
  subnormal = magnitude < (1 << code.mantissa_bits)
  offset = _offset(s, code) + lax.select(subnormal, jnp.full_like(c, _ONE_BINADE),
                                          jnp.zeros_like(c))
  value = lax.bitcast_convert_type((magnitude << shift) + offset, jnp.float32)
  # 2**(1 - top + s), the smallest normal code's value: exact to subtract.
  value = value - lax.select(subnormal, lax.bitcast_convert_type(offset, jnp.float32),
                             jnp.zeros_like(value))
  if code.signed:
    value = lax.bitcast_convert_type(
        lax.bitcast_convert_type(value, jnp.int32) | ((c & 0x80) << 24), jnp.float32)
  return lax.select(c == code.nan, jnp.full_like(value, jnp.nan), value)


def decode(q: Quantized, code: Code) -> jax.Array:
  """The float32 values a :class:`Quantized` stands for (exact)."""
  return _values(q.codes.astype(jnp.int32),
                 _per_element(q.exponents.astype(jnp.int32), q.codes.shape[-1]), code)


def _encode(
    x: jax.Array,
    s: jax.Array,
    code: Code,
    mode: Literal["stochastic", "nearest", "nearest_nonzero", "up"],
    bits: jax.Array | None = None,
) -> jax.Array:
  """The uint8 codes of float32 ``x`` at per-element scale exponents ``s``
  (int32, at least :func:`_needed_exponent` of ``x``).

  ``"nearest"`` rounds to the nearest code (ties to even); ``"up"`` rounds
  the magnitude up and a nonzero one never to zero; ``"stochastic"`` rounds
  to one of the two neighbouring codes, up with probability equal to the
  fraction of the gap below ``|x|`` (``bits``: uniform uint32, of which the
  high 24 are used).
  """
  m = code.mantissa_bits
  shift = _EXPONENT_SHIFT - m
  raw = lax.bitcast_convert_type(x, jnp.uint32)
  magnitude_bits = raw & _ABS_MASK
  nonzero = (magnitude_bits != 0).astype(jnp.int32)
  if mode == "stochastic":
    assert bits is not None
    uniform = bits >> 8

  # Normal codes: the code is the bits above ``shift``, the rest is rounded.
  t = magnitude_bits.astype(jnp.int32) - _offset(s, code)
  base, below = t >> shift, t & ((1 << shift) - 1)
  if mode == "up":
    up = below != 0
  elif mode.startswith("nearest"):
    half = 1 << (shift - 1)
    up = (below > half) | ((below == half) & ((base & 1) == 1))
  else:
    up = uniform < (below << (24 - shift)).astype(jnp.uint32)
  c = base + up.astype(jnp.int32)

  # Subnormal codes (|x| below the smallest normal code): multiples of the
  # lowest binade's spacing, rounded as floats (|x| / spacing is exact).
  scaled = lax.bitcast_convert_type(magnitude_bits, jnp.float32) * _pow2(code.top + m - 1 - s)
  if mode == "up":
    n = jnp.ceil(scaled)
  elif mode.startswith("nearest"):
    n = lax.round(scaled, lax.RoundingMethod.TO_NEAREST_EVEN)
  else:
    low = jnp.floor(scaled)
    n = low + (uniform.astype(jnp.float32) * jnp.float32(2.0**-24) < scaled - low).astype(
        jnp.float32)
  c = lax.select(t >= _ONE_BINADE, c, n.astype(jnp.int32))
  if mode in ("up", "nearest_nonzero"):
    # A positive |x| too small for float32 arithmetic here still gets code 1.
    c = jnp.maximum(c, nonzero)
  c = jnp.minimum(c, code.max_magnitude)
  if code.signed:
    c = c | lax.select((raw >> 31 == 1) & (c != 0), jnp.full_like(c, 0x80), jnp.zeros_like(c))
  c = lax.select(lax.is_finite(x), c, jnp.full_like(c, code.nan))
  return c.astype(jnp.uint8)


def fresh_exponents(x: jax.Array, code: Code) -> jax.Array:
  """Each block's scale exponent (int32): the largest needed by its finite
  values.

  The per-element exponents are reduced as uint8 (offset by 128): XLA:CPU
  materializes the input of a plain reduction, and one byte per element is
  the least it can keep."""
  needed = (_needed_exponent(x, code) + 128).astype(jnp.uint8)
  (largest,) = _block_max([needed], lambda parts: [jnp.max(parts[0], axis=-1)])
  return largest.astype(jnp.int32) - 128


def fresh_exponents_of(*values: tuple[jax.Array, Code]) -> tuple[jax.Array, ...]:
  """:func:`fresh_exponents` of several arrays of one shape, in one
  reduction: a variadic reduction, into which XLA:CPU fuses the computation
  of its inputs (no temporary), reading their common operands once."""
  if len(values) == 1:
    # A variadic reduction of one array is a plain one.
    return (fresh_exponents(*values[0]),)

  def largest(parts: list[jax.Array]) -> list[jax.Array]:
    return list(lax.reduce(
        parts, [np.int32(MIN_EXPONENT)] * len(parts),
        lambda a, b: [lax.max(x, y) for x, y in zip(a, b, strict=True)],
        (parts[0].ndim - 1,)))

  return tuple(_block_max([_needed_exponent(x, code) for x, code in values], largest))


def _block_max(
    arrays: list[jax.Array], largest: Callable[[list[jax.Array]], list[jax.Array]]
) -> list[jax.Array]:
  """``largest`` (a reduction over the last axis) of each block of
  ``arrays``: the whole blocks as one view, the last, shorter block of a
  row apart (padding the arrays would cost every element a bounds check)."""
  *lead, n = arrays[0].shape
  whole = n // BLOCK * BLOCK
  results = []
  if whole:
    results.append(largest([x[..., :whole].reshape(*lead, whole // BLOCK, BLOCK)
                            for x in arrays]))
  if whole < n:
    results.append(largest([x[..., whole:].reshape(*lead, 1, n - whole) for x in arrays]))
  if len(results) == 1:
    return list(results[0])
  return [jnp.concatenate(parts, axis=-1) for parts in zip(*results, strict=True)]


def computed_together(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """``arrays`` (of one shape), all computed in one pass over their inputs
  on CPU.

  XLA:CPU has no multi-output elementwise fusion: left to itself it
  computes each stored buffer in a pass of its own and again inside every
  consumer (the update), from the old codes, which it must then copy before
  the new ones are written over them. A variadic reduction is one fusion with
  several outputs, and its outputs are read, not recomputed, by their
  consumers: each array is reduced (by ``max``) over a new last axis that
  pairs it with the reduction's identity. The other backends fuse sibling
  outputs themselves and get the arrays as they are."""
  if len(arrays) < 2:
    return arrays

  def together(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    shape = arrays[0].shape
    # The identity placed (sharded) like the array it pairs with.
    paired = [lax.concatenate([x[..., None], lax.full_like(x[..., None], _lowest(x.dtype))],
                              len(shape))
              for x in arrays]
    return tuple(lax.reduce(
        paired, [_lowest(x.dtype) for x in arrays],
        lambda a, b: [lax.max(x, y) for x, y in zip(a, b, strict=True)], (len(shape),)))

  return tuple(lax.platform_dependent(*arrays, cpu=together, default=lambda *a: a))


def stored_together(*buffers: Any) -> tuple[Any, ...]:
  """``buffers`` with the codes of the :class:`Quantized` ones
  :func:`computed_together`."""
  codes = iter(computed_together(*[x.codes for x in buffers if is_quantized(x)]))
  return tuple(x._replace(codes=next(codes)) if is_quantized(x) else x for x in buffers)


def _lowest(dtype: Any) -> Any:
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.floating):
    return np.array(-np.inf, dtype)
  return np.array(np.iinfo(dtype).min, dtype)


def scaled_exponents(exponents: jax.Array, scale: jax.Array, code: Code = NU_CODE) -> jax.Array:
  """Block exponents (int32) enough for values up to ``scale`` times those
  that need ``exponents`` (``scale >= 1``, float32): every such value is at
  most ``scale * top * 2**s``, which needs ``s`` plus what ``scale * top``
  needs (exact for ``scale = 1``)."""
  top = jnp.float32(code.magnitude_value(code.max_magnitude))
  shift = _needed_exponent(jnp.asarray(scale, jnp.float32) * top, code)
  return jnp.minimum(exponents + jnp.maximum(shift, 0), _MAX_EXPONENT)


def quantize(
    x: jax.Array,
    code: Code,
    *,
    mode: Literal["stochastic", "nearest", "up"],
    exponents: jax.Array | None = None,
    bits: jax.Array | None = None,
) -> tuple[Quantized, jax.Array]:
  """``(x stored, the float32 values it stands for)``, at block exponents
  ``exponents`` (int32, large enough for ``x``) or fresh ones."""
  if exponents is None:
    exponents = fresh_exponents(x, code)
  s = _per_element(exponents, x.shape[-1])
  codes = _encode(x, s, code, mode, bits)
  return Quantized(codes, exponents.astype(jnp.int8)), _values(codes.astype(jnp.int32), s, code)


def store(
    x: jax.Array,
    buffer: str,
    *,
    stochastic: bool,
    keys: _rounding.StreamKeys | None,
    index: jax.Array | None = None,
    exponents: jax.Array | None = None,
) -> Quantized:
  """A new ``mu`` or ``nu`` (float32) stored under fresh block scales (or
  ``exponents``, those of :func:`fresh_exponents`), rounded stochastically
  (``keys``: the leaf's stream keys for this step) or to nearest."""
  code = CODES[buffer]
  if not stochastic:
    return quantize(x, code, mode="nearest", exponents=exponents)[0]
  if keys is None:
    raise ValueError(f"stochastic rounding of {buffer} to int8 needs stream keys")
  bits = _rounding.random_bits(x.shape, key=keys.of(buffer), buffer=buffer, index=index)
  return quantize(x, code, mode="stochastic", exponents=exponents, bits=bits)[0]


def store_max(x: jax.Array, old: Quantized, needed: jax.Array | None = None) -> Quantized:
  """The new running maximum of ``old`` and ``x`` (float32): scale exponents
  that never decrease, values rounded by :data:`MAX_ROUNDING` (never below
  the old ones, never to zero). ``needed``: the blocks' :func:`fresh_exponents`
  of ``x`` (the old values fit the old exponents), computed by default.

  Rounding is monotone, so the rounded maximum is the larger of ``x``
  rounded and the old value rounded up to the new scale (it is a code there
  unless the scale grew past its binade), which :func:`_rescaled_up` finds
  from the old code without decoding it."""
  if needed is None:
    needed = fresh_exponents(x, NU_CODE)
  old_exponents = old.exponents.astype(jnp.int32)
  exponents = jnp.maximum(old_exponents, needed)
  n = x.shape[-1]
  mode: Literal["nearest_nonzero", "up"] = "nearest_nonzero" if MAX_ROUNDING == "nearest" else "up"
  rounded = _encode(x, _per_element(exponents, n), NU_CODE, mode)
  kept = _rescaled_up(old.codes, _per_element(exponents - old_exponents, n), NU_CODE)
  return Quantized(jnp.maximum(rounded, kept), exponents.astype(jnp.int8))


def _rescaled_up(c: jax.Array, shift: jax.Array, code: Code) -> jax.Array:
  """Unsigned codes ``c`` (uint8) at a scale ``shift >= 0`` binades larger,
  rounded up (a nonzero one never to zero; NaN stays NaN): a normal code
  moves down by ``shift`` binades exactly while it stays normal; below that,
  its significand is divided by the power of two and rounded up."""
  m = code.mantissa_bits
  c32 = c.astype(jnp.int32)
  moved = c32 - (shift << m)
  e = c32 >> m
  significand = lax.select(e > 0, (c32 & ((1 << m) - 1)) | (1 << m), c32)
  # |old| / (new lowest spacing) = significand * 2**-k; past 2**-(m + 2) every
  # nonzero significand rounds up to 1.
  k = jnp.minimum(shift + 1 - jnp.maximum(e, 1), m + 2)
  subnormal = (significand + (1 << k) - 1) >> k
  kept = lax.select(moved >= (1 << m), moved, subnormal)
  return lax.select(c32 == code.nan, c32, kept).astype(jnp.uint8)


def decoded(x: Any, buffer: str) -> Any:
  """``x`` decoded if it is a :class:`Quantized`, as it is otherwise."""
  return decode(x, CODES[buffer]) if is_quantized(x) else x


def is_narrowing(compute_dtype: Any, stored: Any) -> bool:
  """Whether storing in ``stored``'s format rounds the compute dtype."""
  return is_quantized(stored) or _rounding.is_narrowing(compute_dtype, stored.dtype)

