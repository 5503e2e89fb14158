"""Storing float32 moments in a narrower dtype without biasing the averages.

With ``b2 = 0.999`` the increment ``(1 - b2) * g**2`` is below bfloat16's
resolution relative to ``nu``: rounding to nearest throws it away every step
and the average stalls. Stochastic rounding rounds up with probability equal to
the distance to the lower neighbour, so the stored value is unbiased and the
average keeps moving.

The random bits come from a counter-based hash of (seed, step, buffer, leaf,
element index). It needs no key in the state and fuses into the update loop,
where a threefry key split per leaf would cost more than the update itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Distinct odd constants keep the streams of different buffers apart.
_GOLDEN = 0x9E3779B1
_SALTS = {"mu": 0x85EBCA77, "nu": 0xC2B2AE3D}


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection on uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def random_bits(
    shape: tuple[int, ...],
    *,
    seed: jax.Array,
    count: jax.Array,
    buffer: str,
    leaf_index: int,
) -> jax.Array:
  """Uniform uint32 bits, distinct per element, step, buffer, leaf and seed."""
  index = lax.iota(jnp.uint32, max(1, _size(shape)))[: _size(shape)].reshape(shape)
  stream = _fmix32(
      jnp.asarray(seed, jnp.uint32) * jnp.uint32(_GOLDEN)
      ^ jnp.asarray(count, jnp.uint32) * jnp.uint32(_SALTS[buffer])
      ^ jnp.uint32((leaf_index * 0x27D4EB2F) & 0xFFFFFFFF)
  )
  return _fmix32(index * jnp.uint32(_GOLDEN) ^ stream)


def _size(shape: tuple[int, ...]) -> int:
  size = 1
  for dim in shape:
    size *= dim
  return size


def _stochastic_round_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
  # bfloat16 is float32 with the low 16 mantissa bits dropped: adding uniform
  # bits below the cut and truncating rounds up with the right probability.
  raw = lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (raw + (bits >> 16)) & jnp.uint32(0xFFFF0000)
  truncated = lax.bitcast_convert_type(rounded, jnp.float32)
  # Infinities and NaNs are left to the plain cast; adding bits would corrupt
  # them (inf + bits is a NaN pattern).
  return jnp.where(jnp.isfinite(x), truncated, x).astype(jnp.bfloat16)


def _stochastic_round_generic(
    x: jax.Array, dtype: jnp.dtype, bits: jax.Array
) -> jax.Array:
  nearest = x.astype(dtype)
  error = x - nearest.astype(x.dtype)
  toward = jnp.where(error > 0, jnp.inf, -jnp.inf).astype(dtype)
  neighbour = jnp.nextafter(nearest, toward)
  gap = jnp.abs(neighbour.astype(x.dtype) - nearest.astype(x.dtype))
  uniform = (bits >> 8).astype(x.dtype) * x.dtype.type(2.0**-24)
  take_neighbour = (error != 0) & (uniform * gap < jnp.abs(error))
  return jnp.where(take_neighbour, neighbour, nearest)


def is_narrowing(compute_dtype: jnp.dtype, storage_dtype: jnp.dtype) -> bool:
  """True when storing in ``storage_dtype`` loses mantissa bits."""
  if jnp.issubdtype(storage_dtype, jnp.complexfloating):
    return False
  return bool(jnp.finfo(storage_dtype).nmant < jnp.finfo(compute_dtype).nmant)


def store(
    x: jax.Array,
    storage_dtype: jnp.dtype,
    *,
    stochastic: bool,
    seed: jax.Array,
    count: jax.Array,
    buffer: str,
    leaf_index: int,
) -> jax.Array:
  """Casts ``x`` to ``storage_dtype``, stochastically when that narrows it."""
  if not (stochastic and is_narrowing(x.dtype, storage_dtype)):
    return x.astype(storage_dtype)
  x = x.astype(jnp.float32)
  bits = random_bits(
      x.shape, seed=seed, count=count, buffer=buffer, leaf_index=leaf_index
  )
  if jnp.dtype(storage_dtype) == jnp.bfloat16:
    return _stochastic_round_bfloat16(x, bits)
  return _stochastic_round_generic(x, jnp.dtype(storage_dtype), bits)
