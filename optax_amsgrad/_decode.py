"""Reading an optimizer state whatever its storage."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_amsgrad import _blockwise
from optax_amsgrad._transform import ScaleByAmsgradState


def _compute(x: Any, buffer: str) -> jax.Array:
  if _blockwise.is_quantized(x):
    return _blockwise.decode(x, _blockwise.CODES[buffer])
  x = jnp.asarray(x)
  value: jax.Array = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return value


def decode_state(opt_state: optax.OptState) -> optax.OptState:
  """``opt_state`` with the moments of every AMSGrad state in the compute dtype.

  Each :class:`ScaleByAmsgradState` in ``opt_state`` gets ``mu``, ``nu`` and
  ``nu_max`` as arrays shaped like the params, in the dtype the step computes
  in (at least float32): 8-bit blocks (``mu_dtype="int8"``,
  ``nu_dtype="int8"``) are decoded, narrower floats are cast up. These are
  exactly the values the next step starts from. Everything else in
  ``opt_state`` is returned as it is.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> solver = optax_amsgrad.amsgrad(1e-3, mu_dtype="int8", nu_dtype="int8")
    >>> params = {"w": jnp.ones((64, 256))}
    >>> state = solver.init(params)
    >>> _, state = solver.update({"w": jnp.full((64, 256), 2.0)}, state)
    >>> decoded = optax_amsgrad.decode_state(state)
    >>> optax.tree.get(decoded, "nu_max")["w"][0, :2]  # (1 - b2) * 2**2, rounded up
    Array([0.00402832, 0.00402832], dtype=float32)

  Args:
    opt_state: the state of any optimizer.

  Returns:
    The same structure, with the AMSGrad moments decoded.
  """
  def decode(state: Any) -> Any:
    if not isinstance(state, ScaleByAmsgradState):
      return state
    def tree(field: str, buffer: str) -> Any:
      return jax.tree.map(lambda x: _compute(x, buffer), getattr(state, field),
                          is_leaf=_blockwise.is_quantized)
    return state._replace(mu=tree("mu", "mu"), nu=tree("nu", "nu"),
                          nu_max=tree("nu_max", "nu"))

  return jax.tree.map(decode, opt_state,
                      is_leaf=lambda x: isinstance(x, ScaleByAmsgradState))
