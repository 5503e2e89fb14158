"""The AMSGrad arithmetic: each convention's scalars, and one leaf's step.

The conventions as data (:data:`FORMULAS`), the moments, their storage
(``_rounding``), the direction and the step as ``amsgrad``/``amsgradw`` chain
it; nothing here knows which backend runs it. The CPU kernel (``cpu/``) evaluates the
same operations in the same order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_amsgrad import _blockwise, _dtypes, _rounding


class MomentCoefficients(NamedTuple):
  """The scalars of the moment update, in the real compute dtype."""

  b1: jax.Array
  b2: jax.Array
  one_minus_b1: jax.Array
  one_minus_b2: jax.Array
  nu_max_scale: jax.Array


class Direction(NamedTuple):
  """The scalars of the AMSGrad direction ``m * numerator / (sqrt(v_max *
  denominator + eps_root) + eps)``, in the real compute dtype."""

  eps: jax.Array
  eps_root: jax.Array
  numerator: jax.Array
  denominator: jax.Array


class Step(NamedTuple):
  """How the direction ``u`` moves the params, as ``amsgrad``/``amsgradw``
  chain it: ``p + step_size * (u + weight_decay * p)``, the decay only where
  ``decay``; each operation rounded in the params' dtype."""

  step_size: jax.Array
  weight_decay: jax.Array
  decay: bool


class Rounding(NamedTuple):
  """How one leaf's moments are stored: the ``state_rounding`` mode and the
  leaf's stream keys for this step (``_rounding.stream_keys``; None when no
  moment is rounded stochastically)."""

  stochastic: bool
  keys: _rounding.StreamKeys | None


def _complement(x: jax.typing.ArrayLike, dtype: jnp.dtype) -> jax.Array:
  """``1 - x``, taken in float64 on the host when ``x`` is concrete: in float32
  ``1 - 0.999`` is off by 1.3e-5 relative, PyTorch's ``1 - beta2`` is not."""
  if isinstance(x, jax.core.Tracer):
    return 1 - jnp.asarray(x, dtype)
  return jnp.asarray(1.0 - np.asarray(x, np.float64), dtype)


def _bias_correction(b: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
  """``1 - b**t`` as ``-expm1(t log b)``, with ``log b`` taken in float64 on the
  host when ``b`` is concrete: accurate to the last bit in float32 too, where
  ``1 - 0.9f`` is off by 2.4e-7 relative and would not cancel against the
  host-computed ``1 - b1`` of the first moment."""
  if isinstance(b, jax.core.Tracer):
    log_b = jnp.log(jnp.asarray(b, t.dtype))
  else:
    with np.errstate(divide="ignore"):
      log_b = jnp.asarray(np.log(np.asarray(b, np.float64)), t.dtype)
  return -jnp.expm1(t * log_b)


class Formula(NamedTuple):
  """Where a convention puts the bias corrections ``bc1 = 1 - b1**t`` and
  ``bc2 = 1 - b2**t``: the update is ``m * numerator / (sqrt(nu_max *
  denominator + eps_root) + eps)`` and ``nu_max`` takes ``max(nu_max, v *
  nu_max_scale)``. None is 1."""

  numerator: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  denominator: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  nu_max_scale: Callable[[jax.Array, jax.Array], jax.Array] | None = None


# Whose formula a transformation follows (see scale_by_amsgrad's table).
Convention = Literal["pytorch", "keras", "optax", "paper"]
CONVENTIONS: tuple[Convention, ...] = get_args(Convention)

# Every convention is one choice of the three.
FORMULAS: dict[Convention, Formula] = {
    "pytorch": Formula(numerator=lambda bc1, bc2: 1 / bc1,
                       denominator=lambda bc1, bc2: 1 / bc2),
    "keras": Formula(numerator=lambda bc1, bc2: jnp.sqrt(bc2) / bc1),
    "optax": Formula(numerator=lambda bc1, bc2: 1 / bc1,
                     nu_max_scale=lambda bc1, bc2: 1 / bc2),
    "paper": Formula(),
}
assert tuple(FORMULAS) == CONVENTIONS, "one formula per convention"


def coefficients(
    convention: Convention,
    dtype: jnp.dtype,
    count: jax.Array,
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    eps_root: jax.typing.ArrayLike,
) -> tuple[MomentCoefficients, Direction]:
  """The step's scalars in ``dtype``, by the convention's :class:`Formula`."""
  t = count.astype(dtype)
  # Complements and bias corrections are taken from the hyperparameters as
  # given (host float64 when concrete), before they are cast to ``dtype``.
  bc1, bc2 = _bias_correction(b1, t), _bias_correction(b2, t)
  formula = FORMULAS[convention]
  one = jnp.ones([], dtype)

  def value(term: Callable[[jax.Array, jax.Array], jax.Array] | None,
            default: jax.Array) -> jax.Array:
    return default if term is None else jnp.asarray(term(bc1, bc2), dtype)

  moments = MomentCoefficients(
      b1=jnp.asarray(b1, dtype),
      b2=jnp.asarray(b2, dtype),
      one_minus_b1=_complement(b1, dtype),
      one_minus_b2=_complement(b2, dtype),
      nu_max_scale=value(formula.nu_max_scale, one),
  )
  direction = Direction(
      eps=jnp.asarray(eps, dtype),
      eps_root=jnp.asarray(eps_root, dtype),
      numerator=value(formula.numerator, one),
      denominator=value(formula.denominator, one),
  )
  return moments, direction


def saturate(g: jax.Array, real_dtype: jnp.dtype) -> jax.Array:
  """``g`` with every finite magnitude above ``sqrt(finfo.max) / 2`` brought
  down to it (complex values keep their phase); inf and NaN pass unchanged.

  ``|g|**2`` is then at most a quarter of the largest float, and so are ``v``
  and every intermediate of the update (``v / (1 - b2**t) <= max |g|**2``),
  so no overflow can turn ``v_max`` into inf and the update into 0 for good.
  Below the limit (9.2e18 in float32, 6.7e153 in float64) ``g`` is untouched.
  """
  limit = float(np.sqrt(np.finfo(real_dtype).max)) / 2
  if not jnp.iscomplexobj(g):
    # lax rather than jnp.where/clip/isinf: their nested jitted functions
    # cost XLA time on every leaf of a large model.
    bound = np.asarray(limit, g.dtype)
    return lax.select(lax.is_finite(g), lax.clamp(-bound, g, bound), g)
  magnitude = jnp.abs(g)
  large = (magnitude > limit) & ~jnp.isinf(magnitude)
  # The inner where keeps limit / magnitude finite (and its derivative) where
  # the outer one does not take it.
  safe = jnp.where(large, magnitude, limit)
  return jnp.where(large, g * (limit / safe).astype(g.dtype), g)


def moments(
    g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array, c: MomentCoefficients
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The new moments ``m``, ``v`` and ``max(v_max, v * nu_max_scale)`` of one
  leaf, in the compute dtype. Complex ``g`` and ``m`` use ``|g|**2`` for the
  second moment, as Optax does. Gradients too large for their square to be
  represented are saturated first (see ``saturate``); the step depends on
  ``m / sqrt(v_max)``, so an isolated huge gradient still gives the step exact
  arithmetic would."""
  g = saturate(g, c.b2.dtype)
  m = c.b1 * m + c.one_minus_b1 * g
  v = c.b2 * v + c.one_minus_b2 * (g.real * g.real + g.imag * g.imag
                               if jnp.iscomplexobj(g) else g * g)
  v_max = jnp.maximum(v_max, v * c.nu_max_scale)
  return m, v, v_max


def direction(m: jax.Array, v_max: jax.Array, d: Direction) -> jax.Array:
  """The AMSGrad direction from the new (stored) ``m`` and ``v_max``."""
  return m * d.numerator / (jnp.sqrt(v_max * d.denominator + d.eps_root) + d.eps)


def apply_step(u: jax.Array, p: jax.Array, step: Step) -> jax.Array:
  """The params after the step, with the operations of Optax's
  ``add_decayed_weights``, ``scale_by_learning_rate`` and ``apply_updates``."""
  if step.decay:
    u = u + step.weight_decay.astype(u.dtype) * p
  u = step.step_size.astype(u.dtype) * u
  return jnp.asarray(p + u).astype(p.dtype)


def compute_dtypes(param_dtype: jnp.dtype) -> tuple[jnp.dtype, jnp.dtype]:
  """(dtype of m and the update, real dtype of v): at least float32."""
  real = jnp.promote_types(_dtypes.real_dtype(param_dtype), jnp.float32)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return jnp.promote_types(real, jnp.complex64), real
  return real, real


def xla_stored(
    c: MomentCoefficients,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored ``m``, ``v`` and ``v_max`` of one leaf, computed by XLA.

  ``index`` is the global flat position of each element for the random bits
  (by default its position in ``g``); ``split_complex`` keeps one second
  moment per real coordinate of complex params, as PyTorch does.
  """
  m_dtype, v_dtype = compute_dtypes(g.dtype)
  g_c = g.astype(m_dtype)
  stored_before = (m, v, v_max)
  quantized = tuple(map(_blockwise.is_quantized, stored_before))
  m_c = _blockwise.decoded(m, "mu").astype(m_dtype)
  v, v_max = _blockwise.decoded(v, "nu"), _blockwise.decoded(v_max, "nu")
  if split_complex and jnp.iscomplexobj(g):
    v_c, v_max_c = v.astype(m_dtype), v_max.astype(m_dtype)
    parts = [
        moments(part(g_c), part(m_c), part(v_c), part(v_max_c), c)
        for part in (jnp.real, jnp.imag)
    ]
    new_m, new_v, new_v_max = (
        jax.lax.complex(re, im) for re, im in zip(*parts, strict=True)
    )
  else:
    new_m, new_v, new_v_max = moments(
        g_c, m_c, v.astype(v_dtype), v_max.astype(v_dtype), c
    )

  def store(x: jax.Array, like: jax.Array, buffer: str) -> jax.Array:
    return _rounding.store(x, like.dtype, stochastic=rounding.stochastic,
                           keys=rounding.keys, buffer=buffer, index=index)

  if any(quantized):
    return _blockwise_stored(new_m, new_v, new_v_max, stored_before, quantized,
                             store, rounding, c.nu_max_scale, index)

  # nu_max is rounded to nearest (never to zero), which is monotone: the
  # stored value is the rounded true maximum (of v and of the stored nu, so
  # nu <= nu_max holds in the state), never below the previous one and never
  # ratcheted upwards by rounding noise.
  stored_m = store(new_m, m, "mu")
  stored_v = store(new_v, v, "nu")
  stored_v_max = _rounding.store_max(
      new_v_max, v_max.dtype, stochastic=rounding.stochastic,
      at_least=stored_v, scale=c.nu_max_scale,
  )
  return stored_m, stored_v, stored_v_max


def _blockwise_stored(
    new_m: jax.Array,
    new_v: jax.Array,
    new_v_max: jax.Array,
    old: tuple[Any, Any, Any],
    quantized: tuple[bool, ...],
    store: Callable[[jax.Array, jax.Array, str], jax.Array],
    rounding: Rounding,
    nu_max_scale: jax.Array,
    index: jax.Array | None,
) -> tuple[Any, Any, Any]:
  """:func:`xla_stored`'s stores where some buffer is 8-bit
  (``_blockwise``): ``nu_max`` rounded under block scales that never
  decrease, never below its old value."""
  m, v, v_max = old
  mu_int8, nu_int8 = quantized[0], quantized[1]
  assert quantized[2] == nu_int8, "nu_max follows nu's storage"
  # The block scales of the new mu and nu, in one reduction. nu_max's new
  # values are v * nu_max_scale (its old ones fit its old scales): the scales
  # they need follow from v's.
  scales = iter(_blockwise.fresh_exponents_of(*[
      (x, _blockwise.CODES[buffer])
      for x, buffer, int8 in ((new_m, "mu", mu_int8), (new_v, "nu", nu_int8)) if int8]))
  if mu_int8:
    stored_m: Any = _blockwise.store(new_m, "mu", stochastic=rounding.stochastic,
                                     keys=rounding.keys, index=index, exponents=next(scales))
  else:
    stored_m = store(new_m, m, "mu")
  stored_v: Any
  stored_v_max: Any
  if nu_int8:
    v_exponents = next(scales)
    stored_v = _blockwise.store(new_v, "nu", stochastic=rounding.stochastic,
                                keys=rounding.keys, index=index, exponents=v_exponents)
    # Not raised to the stored nu, unlike narrower floats: the stochastic
    # rounding's noise would inflate a running maximum of it.
    stored_v_max = _blockwise.store_max(
        new_v * nu_max_scale, v_max, _blockwise.scaled_exponents(v_exponents, nu_max_scale))
  else:
    stored_v = store(new_v, v, "nu")
    stored_v_max = _rounding.store_max(new_v_max, v_max.dtype, stochastic=rounding.stochastic,
                                       at_least=stored_v.astype(new_v.dtype), scale=nu_max_scale)
  return _blockwise.stored_together(stored_m, stored_v, stored_v_max)


def xla_stepped(
    c: MomentCoefficients,
    d: Direction,
    step: Step,
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(p, m, v, v_max)`` after the step for one leaf, by XLA."""
  new_m, new_v, new_v_max = xla_stored(
      c, g, m, v, v_max, rounding=rounding, split_complex=split_complex, index=index
  )
  u = update_from_stored(new_m, new_v_max, d, g.dtype, split_complex=split_complex)
  return apply_step(u, p, step), new_m, new_v, new_v_max


def update_from_stored(
    m: jax.Array, v_max: jax.Array, d: Direction, dtype: jnp.dtype, *, split_complex: bool
) -> jax.Array:
  """The direction from the stored moments, cast back up, in ``dtype``."""
  m_dtype, v_dtype = compute_dtypes(dtype)
  m_u = _blockwise.decoded(m, "mu").astype(m_dtype)
  v_max = _blockwise.decoded(v_max, "nu")
  if split_complex and jnp.iscomplexobj(m_u):
    v_max_u = v_max.astype(m_dtype)
    u = jax.lax.complex(
        *(direction(part(m_u), part(v_max_u), d) for part in (jnp.real, jnp.imag))
    )
  else:
    u = direction(m_u, v_max.astype(v_dtype), d)
  return u.astype(dtype)


# Jitted for the update the CPU kernel's callers compute from the moments it
# stored: a model's many 8-bit leaves of one shape are traced once, not each
# op by op.
leaf_update = jax.jit(update_from_stored, static_argnames=("dtype", "split_complex"))


@functools.partial(jax.jit, static_argnames=("stochastic", "split_complex", "decay", "with_update"))
def leaf_step(
    c: MomentCoefficients,
    d: Direction,
    stepping: tuple[jax.Array, jax.Array] | None,
    g: jax.Array,
    p: jax.Array | None,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    keys: _rounding.StreamKeys | None,
    index: jax.Array | None = None,
    *,
    stochastic: bool,
    split_complex: bool,
    decay: bool = False,
    with_update: bool = True,
) -> tuple[jax.Array, ...]:
  """One leaf's step by XLA: ``(p, m, v, v_max)`` after it with ``p`` and
  ``stepping`` (``(step_size, weight_decay)``); without them ``(u, m, v,
  v_max)``, or ``(m, v, v_max)`` when not ``with_update``.

  Jitted, so that a model's many leaves of one shape, dtype and options are
  traced and lowered once, and called; XLA inlines the calls."""
  rounding = Rounding(stochastic, keys)
  if p is not None:
    assert stepping is not None
    return xla_stepped(c, d, Step(*stepping, decay), g, p, m, v, v_max,
                       rounding=rounding, split_complex=split_complex, index=index)
  stored = xla_stored(c, g, m, v, v_max, rounding=rounding, split_complex=split_complex,
                      index=index)
  if not with_update:
    return stored
  return (update_from_stored(stored[0], stored[2], d, g.dtype, split_complex=split_complex),
          *stored)
