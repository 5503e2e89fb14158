"""Blockwise 8-bit storage of the moments (``mu_dtype="int8"``/``nu_dtype="int8"``).

A stored leaf is a :class:`Quantized`: one uint8 code per element, shaped like
the params, and one int8 power-of-two scale exponent ``s`` per block of
:data:`BLOCK` consecutive elements along the last axis (blocks stay within a
row, so the exponents are shaped like the leaf with the last axis divided by
the block, rounded up, and shard with it: no collective in the step).

The codes are small floats relative to the block's scale ``2**s``, decoded with
integer arithmetic on the bits and one multiplication by an exact power of two
(no ``exp2``, no 256-entry gather): a magnitude code ``c`` with ``E`` exponent
and ``M`` mantissa bits has field ``e = c >> M`` and ``f = c & (2**M - 1)``, and
stands for ``(f + 2**M [e > 0]) * 2**(max(e, 1) - (2**E - 1) + s - M)``. The
top binade ``e = 2**E - 1`` covers ``[2**s, 2**(s + 1))``; ``e = 0`` continues
the lowest binade's spacing down to zero (subnormals). Read as integers, the
codes are in the order of the values they stand for, so rounding carries from
one binade to the next by itself.

- ``nu`` and ``nu_max`` (non-negative): E4M4, 15 binades (4.5 decades) at a
  relative spacing of at most 1/16 below the block's largest value, and 4
  more of subnormals. Code 255 is NaN.
- ``mu`` (signed): a sign bit and an E4M3 magnitude, 15 binades at 1/8. The
  code of negative zero, 0x80, is NaN.

Why not a dynamic map (Dettmers et al. 2022): decoding it is a gather from a
256-entry table per element, which XLA turns into a loop on CPU and a
scattered read on accelerators, and a round-up or stochastic rounding to it
needs a search; the float-like code rounds with the same integer arithmetic
as a float and decodes exactly. The second moment, which spans the square of
the gradients' range, gets the exponent bits; E4M4 for it resolves the
values near the block's maximum (the coordinates whose steps are limited by
``nu_max``) to 3% in ``sqrt(nu)``.

The rounding of each buffer:

- ``mu`` and ``nu``: a fresh scale from the block's largest finite new
  value each step, and stochastic (unbiased) rounding: with ``b2 = 0.999`` the
  increment of ``nu`` is far below a code step.
- ``nu_max``: the scale exponent is the larger of the stored one and the one
  the new values need, so it never decreases; the new maximum (the decoded
  old one, the new ``v`` and the stored ``nu``) is rounded up, and a positive
  value never to zero. With an unchanged scale a stored value is a code and
  rounds up to itself; under a larger scale its code shifts exactly (or, in
  the subnormal range, rounds up). So the ``nu_max`` the step uses never
  decreases and is never below the float32 maximum of what it has seen.
- A non-finite value is stored as NaN (its element's own code only) and never
  sets its block's scale.

Scales have a floor, :data:`MIN_EXPONENT`, at which the smallest code is still
a normal float32 (XLA:CPU flushes subnormals): values below ``2**-118``
(1e-36) are rounded at that spacing, ``nu_max`` up to it.

Leaves of fewer than :data:`MIN_SIZE` elements, or whose last axis is shorter
than :data:`MIN_ROW`, and complex or float64 leaves keep their state in the
compute dtype (float32): they are few parameters, and their scales would cost
more than the codes save.
"""

from __future__ import annotations

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
MIN_EXPONENT = -100
"""The smallest block scale exponent."""
_MAX_EXPONENT = 127

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
NU_CODE = Code(4, 4, signed=False)
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
  # The exponents derive from the codes (a strided slice of them), so they
  # are placed where the codes are, sharded along the same axes. Jitted, as
  # the step computes them: an eager strided slice of a leaf sharded along
  # its last axis comes back replicated, and the first step would return
  # another sharding and compile the loop's step again.
  exponents = jax.jit(_floor_exponents)(codes)
  assert exponents.shape == shape
  return Quantized(codes, exponents)


def _floor_exponents(codes: jax.Array) -> jax.Array:
  exponents: jax.Array = codes[..., ::BLOCK].astype(jnp.int8) + jnp.int8(MIN_EXPONENT)
  return exponents


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
  threshold = np.uint32(round((top - 1.0) * 2**23))
  needed = _binade(bits) + ((bits & _MANTISSA_MASK) > threshold).astype(jnp.int32)
  needed = lax.select(lax.is_finite(x), needed, jnp.full_like(needed, MIN_EXPONENT))
  return lax.clamp(jnp.int32(MIN_EXPONENT), needed, jnp.int32(_MAX_EXPONENT))


def _block_max(s: jax.Array) -> jax.Array:
  """Per-block maximum of an int32 array along its last axis."""
  n = s.shape[-1]
  blocks = -(-n // BLOCK)
  padded = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, blocks * BLOCK - n)],
                   constant_values=MIN_EXPONENT)
  return jnp.max(padded.reshape(*s.shape[:-1], blocks, BLOCK), axis=-1)


def _per_element(exponents: jax.Array, n: int) -> jax.Array:
  """Block exponents (int32) broadcast to the elements of a last axis of
  ``n``."""
  blocks = exponents.shape[-1]
  wide = jnp.broadcast_to(exponents[..., None], (*exponents.shape, BLOCK))
  return wide.reshape(*exponents.shape[:-1], blocks * BLOCK)[..., :n]


def decode(q: Quantized, code: Code) -> jax.Array:
  """The float32 values a :class:`Quantized` stands for (exact)."""
  c = q.codes.astype(jnp.int32)
  s = _per_element(q.exponents.astype(jnp.int32), q.codes.shape[-1])
  magnitude = c & (code.max_magnitude if code.signed else 0xFF)
  e = magnitude >> code.mantissa_bits
  f = magnitude & ((1 << code.mantissa_bits) - 1)
  significand = f + jnp.where(e > 0, 1 << code.mantissa_bits, 0)
  k = jnp.maximum(e, 1) + (s - code.top - code.mantissa_bits)
  value = significand.astype(jnp.float32) * _pow2(k)
  if code.signed:
    value = jnp.where(c >= 0x80, -value, value)
  return jnp.where(c == code.nan, jnp.float32(jnp.nan), value)


def _encode(
    x: jax.Array,
    s: jax.Array,
    code: Code,
    mode: Literal["stochastic", "nearest", "up"],
    bits: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(codes, the values they stand for)`` of float32 ``x`` at per-element
  scale exponents ``s`` (int32, at least :func:`_needed_exponent` of ``x``).

  ``"up"`` rounds the magnitude up and a nonzero one never to zero;
  ``"stochastic"`` rounds to one of the two neighbouring codes, up with
  probability equal to the fraction of the gap below ``|x|`` (``bits``:
  uniform uint32).
  """
  raw = lax.bitcast_convert_type(x, jnp.uint32)
  magnitude_bits = raw & _ABS_MASK
  magnitude = lax.bitcast_convert_type(magnitude_bits, jnp.float32)
  m = code.mantissa_bits
  field = jnp.maximum(_binade(magnitude_bits) - s + code.top, 1)
  k = field - code.top + s - m
  # |x| / 2**k, exact: a power of two in the normal range (s >= the floor).
  scaled = magnitude * _pow2(-k)
  low = jnp.floor(scaled)
  if mode == "up":
    n = jnp.ceil(scaled).astype(jnp.int32)
    # A positive |x| too small for float32 arithmetic here still gets code 1.
    n = jnp.maximum(n, (magnitude_bits != 0).astype(jnp.int32))
  elif mode == "nearest":
    n = jnp.round(scaled).astype(jnp.int32)
  else:
    assert bits is not None
    uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    n = (low + (uniform < scaled - low).astype(jnp.float32)).astype(jnp.int32)
  c = jnp.minimum((field - 1) * (1 << m) + n, code.max_magnitude)
  e = c >> m
  significand = (c & ((1 << m) - 1)) + jnp.where(e > 0, 1 << m, 0)
  value = significand.astype(jnp.float32) * _pow2(jnp.maximum(e, 1) + (s - code.top - m))
  finite = lax.is_finite(x)
  if code.signed:
    negative = (raw >> 31) == 1
    c = jnp.where(negative & (c != 0), c | 0x80, c)
    value = jnp.where(negative, -value, value)
  c = jnp.where(finite, c, code.nan)
  value = jnp.where(finite, value, jnp.float32(jnp.nan))
  return c.astype(jnp.uint8), value


def fresh_exponents(x: jax.Array, code: Code) -> jax.Array:
  """Each block's scale exponent (int32) from its largest finite value."""
  return _block_max(_needed_exponent(x, code))


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
  codes, value = _encode(x, _per_element(exponents, x.shape[-1]), code, mode, bits)
  return Quantized(codes, exponents.astype(jnp.int8)), value


def store(
    x: jax.Array,
    buffer: str,
    *,
    stochastic: bool,
    keys: _rounding.StreamKeys | None,
    index: jax.Array | None = None,
) -> tuple[Quantized, jax.Array]:
  """A new ``mu`` or ``nu`` (float32) stored under fresh block scales, and
  the values it stands for: rounded stochastically (``keys``: the leaf's
  stream keys for this step) or to nearest."""
  code = CODES[buffer]
  if not stochastic:
    return quantize(x, code, mode="nearest")
  if keys is None:
    raise ValueError(f"stochastic rounding of {buffer} to int8 needs stream keys")
  bits = _rounding.random_bits(x.shape, key=keys.of(buffer), buffer=buffer, index=index)
  return quantize(x, code, mode="stochastic", bits=bits)


def store_max(x: jax.Array, old: Quantized) -> Quantized:
  """The new running maximum ``x`` (float32, at least the decoded ``old``):
  scale exponents that never decrease, values rounded up."""
  exponents = jnp.maximum(old.exponents.astype(jnp.int32), fresh_exponents(x, NU_CODE))
  return quantize(x, NU_CODE, mode="up", exponents=exponents)[0]


def decoded(x: Any, buffer: str) -> Any:
  """``x`` decoded if it is a :class:`Quantized`, as it is otherwise."""
  return decode(x, CODES[buffer]) if is_quantized(x) else x


def is_narrowing(compute_dtype: Any, stored: Any) -> bool:
  """Whether storing in ``stored``'s format rounds the compute dtype."""
  return is_quantized(stored) or _rounding.is_narrowing(compute_dtype, stored.dtype)
