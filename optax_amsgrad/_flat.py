"""A flat layout of the optimizer state: one contiguous buffer per dtype.

With the default layout every leaf of the params costs each step a few small
kernels and a few buffers to pass in and out, whatever its size. For a model
of hundreds of small leaves those fixed costs, not the arithmetic, set the
step time. :func:`flatten_by_dtype` runs any transformation on one 1-D buffer
per dtype instead: its state holds a handful of buffers, the arithmetic runs
as a few large kernels, and only the returned updates are cut back into the
params' shapes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_amsgrad import _step, cpu


class FlatState(NamedTuple):
  """State of :func:`flatten_by_dtype`.

  Attributes:
    inner_state: the state of the wrapped transformation, built on a dict that
      maps each dtype name (``"float32"``, ``"bfloat16"``, ...) to a 1-D
      buffer holding every leaf of that dtype, raveled and concatenated in
      ``jax.tree.leaves`` order.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> solver = optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-2))
    >>> state = solver.init({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    >>> optax.tree.get(state, "nu_max")["float32"].shape
    (7,)
  """

  inner_state: optax.OptState


def ravel_by_dtype(tree: Any) -> dict[str, jax.Array]:
  """The leaves of ``tree`` raveled and concatenated, one 1-D array per dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> tree = {"w": jnp.ones((2, 2)), "b": jnp.zeros(3, jnp.bfloat16)}
    >>> flat = optax_amsgrad.ravel_by_dtype(tree)
    >>> {name: buffer.shape for name, buffer in flat.items()}
    {'bfloat16': (3,), 'float32': (4,)}

  Args:
    tree: a pytree of arrays.

  Returns:
    A dict from dtype name to a 1-D array; leaves keep their dtype.
  """
  groups: dict[str, list[jax.Array]] = {}
  for leaf in jax.tree.leaves(tree):
    leaf = jnp.asarray(leaf)
    groups.setdefault(leaf.dtype.name, []).append(jnp.ravel(leaf))
  # A single leaf needs no concatenation: its ravel is a free reshape.
  return {
      name: parts[0] if len(parts) == 1 else jnp.concatenate(parts)
      for name, parts in sorted(groups.items())
  }


def unravel_by_dtype(flat: dict[str, jax.Array], like: Any) -> Any:
  """Inverse of :func:`ravel_by_dtype`: cuts ``flat`` into the leaves of ``like``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> tree = {"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.zeros(3)}
    >>> flat = optax_amsgrad.ravel_by_dtype(tree)
    >>> optax_amsgrad.unravel_by_dtype(flat, tree)["w"]
    Array([[0., 1.],
           [2., 3.]], dtype=float32)

  Args:
    flat: a dict from dtype name to a 1-D array, as made by
      :func:`ravel_by_dtype` for a tree of the same structure, shapes and
      dtypes as ``like``.
    like: a pytree of arrays (or ``jax.ShapeDtypeStruct``) giving the
      structure, shapes and dtypes of the result.

  Returns:
    A pytree shaped like ``like``.
  """
  leaves, treedef = jax.tree.flatten(like)
  sizes: dict[str, list[int]] = {}
  for leaf in leaves:
    sizes.setdefault(jnp.result_type(leaf).name, []).append(
        math.prod(jnp.shape(leaf))
    )
  needed = {name: sum(group) for name, group in sorted(sizes.items())}
  have = {name: math.prod(jnp.shape(buffer)) for name, buffer in sorted(flat.items())}
  if needed != have:
    raise ValueError(
        "unravel_by_dtype: the flat buffers do not match the tree: the tree "
        f"needs {needed} elements per dtype, the buffers hold {have}."
    )
  # One split per dtype rather than a slice per leaf: the derivative of a
  # split is a single concatenation, that of many slices a sum of full-size
  # zero-padded arrays.
  parts = {
      name: iter(jax.lax.split(jnp.ravel(flat[name]), group))
      for name, group in sizes.items()
  }
  pieces = []
  for leaf in leaves:
    dtype = jnp.result_type(leaf)
    pieces.append(next(parts[dtype.name]).reshape(jnp.shape(leaf)).astype(dtype))
  return jax.tree.unflatten(treedef, pieces)


def flatten_by_dtype(
    inner: optax.GradientTransformation,
    *,
    implementation: cpu.Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on one contiguous 1-D buffer per dtype.

  The gradients (and the params, when given) are raveled and concatenated by
  dtype before ``inner`` sees them, so ``inner``'s state is a few large
  buffers instead of trees shaped like the params, and the updates are cut
  back into the gradients' shapes. Each step then runs a few large kernels
  instead of a few small ones per leaf, which is faster for models with
  many small leaves (hundreds of biases and norms). For models made of a few
  large leaves the default layout is faster: raveling the gradients and
  cutting the updates cost two extra passes over memory.

  Unlike ``optax.flatten``, which promotes every leaf to one common dtype,
  each dtype keeps its own buffer, so bfloat16 and float32 leaves keep
  their dtypes and state sizes. The result is still an
  ``optax.GradientTransformation``: it chains, jits, works under
  ``optax.inject_hyperparams`` (wrap the inner optimizer, or the whole
  ``flatten_by_dtype(...)`` factory) and its state is a pytree of arrays that
  checkpoints like any other. Transformations that need a mask or any other
  tree shaped like the params (``amsgradw``'s ``mask``, ``optax.masked``)
  go outside the wrapper, as in the second example. The gradients must have
  the params' dtypes. Leaves sharded over several devices are gathered by the
  concatenation; keep the default layout for sharded models.

  :func:`optax_amsgrad.apply_step` on ``flatten_by_dtype(amsgrad(...))`` (or
  ``amsgradw`` without a mask) skips the raveling and the cutting on CPU: one
  pass reads each leaf's gradient and params and the flat state, and writes
  the params and the state in place.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> params = {f"layer{i}": {"b": jnp.zeros(4), "w": jnp.ones((4, 4))}
    ...           for i in range(3)}
    >>> solver = optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-3))
    >>> state = solver.init(params)
    >>> state.inner_state[0].nu_max["float32"].shape
    (60,)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(solver.update)(grads, state)
    >>> optax.apply_updates(params, updates)["layer0"]["b"]
    Array([-0.001, -0.001, -0.001, -0.001], dtype=float32)

    With decoupled weight decay on the weights only, the mask stays outside:

    >>> solver = optax.chain(
    ...     optax_amsgrad.flatten_by_dtype(optax_amsgrad.scale_by_amsgrad()),
    ...     optax.add_decayed_weights(1e-2, mask=lambda p: {
    ...         k: {"b": False, "w": True} for k in p}),
    ...     optax.scale_by_learning_rate(1e-3),
    ... )
    >>> state = solver.init(params)
    >>> updates, state = solver.update(grads, state, params)

  Args:
    inner: the transformation to run on the flat buffers, for example
      :func:`optax_amsgrad.amsgrad` or :func:`optax_amsgrad.scale_by_amsgrad`.
    implementation: the path of :func:`optax_amsgrad.apply_step`'s single
      pass over the flat state: ``"cpu"``, the CPU kernel (an error where it
      was not built or ``inner`` was built with ``implementation="xla"``);
      ``"xla"``, ``inner``'s update and ``apply_updates``; ``None``, whatever
      ``inner`` was built with. ``inner``'s own ``update`` keeps its own
      implementation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`FlatState`.
  """
  original = inner
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> FlatState:
    return FlatState(inner_state=inner.init(ravel_by_dtype(params)))

  def update_fn(
      updates: optax.Updates,
      state: FlatState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, FlatState]:
    if not isinstance(state, FlatState):
      raise TypeError(
          "flatten_by_dtype: expected a FlatState, got "
          f"{type(state).__module__}.{type(state).__qualname__}. Was this state "
          "made by another optimizer's init?"
      )
    flat_params = None if params is None else ravel_by_dtype(params)
    flat_updates, inner_state = inner.update(
        ravel_by_dtype(updates), state.inner_state, flat_params, **extra_args
    )
    return unravel_by_dtype(flat_updates, updates), FlatState(inner_state)

  # apply_step takes one pass over the leaves and the flat state.
  return optax.GradientTransformationExtraArgs(
      init_fn, _step.flat_update(update_fn, original, implementation))
