"""Where a new optimizer state lives: where the jitted step will return it.

jit keys its cache on each argument's sharding and on whether it is committed
to a device. A jitted step returns committed arrays whenever one of its
arguments is committed, and uncommitted ones when none is, and it writes a
``NamedSharding``'s spec in a form of its own (see ``_as_returned``). A state
that ``init`` made anywhere else would come back from the first step
different, and the second step would compile again. So ``init`` puts each
moment where the step will: uncommitted beside an uncommitted param, on a
committed param's sharding with its spec written as jit writes it; and the
step count, a scalar, where the committed params are (replicated over their
mesh), or uncommitted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec, SingleDeviceSharding


def _is_committed(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and (
      leaf.committed
  )


def _as_returned(sharding: Any, ndim: int) -> Any:
  """``sharding`` as a jitted function returns it. The spec of a
  ``NamedSharding`` comes back with one entry per dimension on meshes with
  Explicit axes (``P('x')`` of a matrix becomes ``P('x', None)``), and with
  trailing ``None`` entries dropped on meshes whose axes are all Auto; each
  form is another cache key."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  entries = [*sharding.spec, *(None,) * (ndim - len(sharding.spec))]
  if all(kind == AxisType.Auto for kind in sharding.mesh.axis_types):
    while entries and entries[-1] is None:
      entries.pop()
  spec = PartitionSpec(*entries)  # type: ignore[no-untyped-call]
  return NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def zeros_like(param: Any, dtype: jax.typing.DTypeLike) -> jax.Array:
  """Zeros shaped like ``param``, placed as a jitted step returns them."""
  if isinstance(param, jax.core.Tracer):
    # Under jit a constant has no sharding of its own: the compiler would put
    # it on one device (or replicate it). Selecting between the param and
    # zeros with an all-false mask keeps the value at zero, NaNs included,
    # but lets sharding propagation give it the param's sharding, on meshes
    # with Auto as well as Explicit axes.
    zeros = jnp.where(jnp.zeros_like(param, dtype=bool), param, jnp.zeros_like(param))
    if jnp.iscomplexobj(zeros) and not jnp.issubdtype(dtype, jnp.complexfloating):
      zeros = jnp.real(zeros)
    return zeros.astype(dtype)
  shape = jnp.shape(param)
  if isinstance(param, jax.ShapeDtypeStruct):
    sharding = param.sharding
  elif _is_committed(param):
    sharding = _as_returned(param.sharding, len(shape))
  else:
    sharding = None
  return jnp.zeros(shape, dtype, device=sharding)


def scalar_sharding(tree: Any) -> Any:
  """Where a scalar of the state belongs: replicated over the mesh of the
  committed leaves of ``tree``, on their device, or None (uncommitted) when
  no leaf is committed."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
      sharding = leaf.sharding
    elif _is_committed(leaf):
      sharding = leaf.sharding
    else:
      continue
    if isinstance(sharding, NamedSharding):
      replicated = PartitionSpec()  # type: ignore[no-untyped-call]
      return NamedSharding(sharding.mesh, replicated, memory_kind=sharding.memory_kind)
    if len(sharding.device_set) == 1:
      return SingleDeviceSharding(next(iter(sharding.device_set)))
  return None


def scalar_zeros(tree: Any, dtype: jax.typing.DTypeLike) -> jax.Array:
  """A zero scalar placed by :func:`scalar_sharding`."""
  return jnp.zeros([], dtype, device=scalar_sharding(tree))


def with_placed_init(
    solver: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``solver`` whose ``init`` also places the scalars that Optax's own
  transformations create uncommitted (the step count of a schedule): beside
  committed params they go where :func:`scalar_sharding` says, as the step
  returns them."""

  def init_fn(params: optax.Params) -> optax.OptState:
    state = solver.init(params)
    sharding = scalar_sharding(params)
    if sharding is None:
      return state
    return jax.tree.map(
        lambda leaf: jax.device_put(leaf, sharding)
        if isinstance(leaf, jax.Array) and not _is_committed(leaf) and leaf.ndim == 0
        and not isinstance(leaf, jax.core.Tracer) else leaf,
        state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, solver.update)
