"""Checks on hyperparameters and on gradient trees, done at trace time."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

CONVENTIONS = ("pytorch", "keras", "optax", "paper")


def check_convention(convention: object) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(
        f"convention must be one of {', '.join(map(repr, CONVENTIONS))}; "
        f"got {convention!r}."
    )


def _concrete_float(name: str, value: object) -> float | None:
  """Returns ``value`` as a float, or None when it is traced (checked later)."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a real number, got the boolean {value!r}.")
  if isinstance(value, (str, bytes, list, tuple, dict, set)):
    raise TypeError(
        f"{name} must be a real scalar (float or 0-d array), got "
        f"{type(value).__name__} {value!r}."
    )
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except Exception as error:  # pragma: no cover - exotic array-likes
    raise TypeError(f"{name} must be a real scalar, got {value!r}.") from error
  if array.shape != ():
    raise TypeError(f"{name} must be a scalar, got an array of shape {array.shape}.")
  if not (np.issubdtype(array.dtype, np.floating)
          or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"{name} must be a real scalar, got dtype {array.dtype}.")
  return float(array)


def check_unit_interval(name: str, value: object) -> None:
  """``value`` must lie in [0, 1) when it is concrete."""
  number = _concrete_float(name, value)
  if number is None:
    return
  if math.isnan(number) or not 0.0 <= number < 1.0:
    raise ValueError(f"{name} must be in the range [0, 1); got {number!r}.")


def check_non_negative(name: str, value: object) -> None:
  """``value`` must be finite and >= 0 when it is concrete."""
  number = _concrete_float(name, value)
  if number is None:
    return
  if not (math.isfinite(number) and number >= 0.0):
    raise ValueError(f"{name} must be finite and >= 0; got {number!r}.")


def check_b1(b1: object, convention: str) -> None:
  if callable(b1):
    if convention != "paper":
      raise ValueError(
          "A b1 schedule (the paper's beta_1t) needs convention='paper': the "
          "bias correction 1 - b1**t of the other conventions assumes a constant "
          f"b1. Got convention={convention!r}."
      )
    return
  check_unit_interval("b1", b1)


def check_storage_dtype(name: str, dtype: Any) -> None:
  if dtype is None:
    return
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(f"{name} must be a dtype or None, got {dtype!r}.") from error
  if not jnp.issubdtype(resolved, jnp.inexact):
    raise TypeError(
        f"{name} must be a floating-point or complex dtype, got {resolved}."
    )


def check_params_dtypes(tree: Any, *, what: str) -> None:
  """AMSGrad is defined for floating-point and complex leaves only."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"AMSGrad needs floating-point or complex {what}; the leaf at "
          f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. Cast "
          "it to a float dtype, or exclude it with optax.masked / "
          "optax.set_to_zero."
      )


def check_updates_match_state(updates: Any, mu: Any, *, name: str) -> None:
  """Raises a ValueError naming both trees when structure or shapes differ."""
  updates_def = jax.tree.structure(updates)
  state_def = jax.tree.structure(mu)
  if updates_def != state_def:
    raise ValueError(
        f"{name}: the gradient tree does not match the optimizer state.\n"
        f"  gradients: {updates_def}\n"
        f"  state:     {state_def}\n"
        "Was the state initialised with params of another structure?"
    )
  try:
    chex.assert_trees_all_equal_shapes(updates, mu)
  except AssertionError as error:
    raise ValueError(
        f"{name}: a gradient leaf's shape differs from the state's (which "
        f"follows the params it was initialised with). {error}"
    ) from None
  check_params_dtypes(updates, what="gradients")


def resolve_b1(b1: float | jax.Array | Callable[[jax.Array], jax.Array],
               count: jax.Array) -> jax.Array:
  """The decay of the first moment at this step (the paper's beta_1t)."""
  return jnp.asarray(b1(count) if callable(b1) else b1)
