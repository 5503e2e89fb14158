"""Checks on hyperparameters, trees and states, done at construction or trace
time (never in the compiled step).

Every message names the argument or the tree path at fault, what was found and
what was expected, so that the fix is clear from the message alone.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from optax_amsgrad import _blockwise, _dtypes, _math, _rounding

# Storage dtypes whose exponent range cannot hold |g|**2 for ordinary
# gradients: float16 overflows at |g| > 256 and flushes |g| < 2.4e-4 to zero.
# The second moment holds |g|**2: its storage needs float32's exponent range.
_FLOAT32_MAXEXP = int(np.finfo(np.float32).maxexp)

# How many differing paths a message lists before it stops.
_MAX_LISTED = 5


def path_name(path: tuple[Any, ...]) -> str:
  """``['layer'][0].kernel``, or ``<root>`` for a tree that is one array."""
  return jax.tree_util.keystr(path) or "<root>"


def chex_checked(
    assertion: Callable[..., None],
    *trees: Any,
    error: type[Exception],
    message: Callable[[], str],
) -> None:
  """Runs a chex tree assertion (at trace time: nothing of it is compiled)
  and turns its failure into ``error`` with the project's ``message``, which
  names the argument and the paths; chex's own message stays as the cause."""
  try:
    assertion(*trees)
  except AssertionError as chex_error:
    raise error(message()) from chex_error


def _list_paths(paths: Iterable[str]) -> str:
  paths = list(paths)
  shown = ", ".join(paths[:_MAX_LISTED])
  if len(paths) > _MAX_LISTED:
    shown += f" and {len(paths) - _MAX_LISTED} more"
  return shown


# ----------------------------------------------------------------------------
# Hyperparameters.
# ----------------------------------------------------------------------------


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
  """``value`` must be one of ``choices``; suggests the nearest one."""
  if isinstance(value, str) and value in choices:
    return
  hint = ""
  if isinstance(value, str):
    close = difflib.get_close_matches(value.lower(), choices, n=1)
    if close:
      hint = f" Did you mean {close[0]!r}?"
  raise ValueError(
      f"{name} must be one of {', '.join(map(repr, choices))}; got "
      f"{value!r}.{hint}"
  )


def check_convention(convention: object) -> None:
  check_choice("convention", convention, _math.CONVENTIONS)


def check_state_rounding(state_rounding: object) -> None:
  check_choice("state_rounding", state_rounding, _rounding.STATE_ROUNDINGS)


def _concrete_float(name: str, value: object) -> float | None:
  """Returns ``value`` as a float, or None when it is traced (a hyperparameter
  injected with ``optax.inject_hyperparams`` under jit): traced values cannot
  be checked without a cost in the compiled step."""
  if value is None:
    raise TypeError(f"{name} must be a real number; got None.")
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a real number; got the boolean {value!r}.")
  if isinstance(value, (str, bytes)):
    raise TypeError(
        f"{name} must be a real number, not a string; got {value!r}. Pass "
        f"{name}=float(...) if the value was read from a config file."
    )
  if isinstance(value, (list, tuple, dict, set)):
    raise TypeError(
        f"{name} must be a real scalar (a float or a 0-d array); got a "
        f"{type(value).__name__}: {value!r}."
    )
  if isinstance(value, jax.core.Tracer):
    return None
  if callable(value):
    raise TypeError(
        f"{name} must be a real number; got the callable {value!r}. Only b1 "
        "may be a schedule, and only with convention='paper'."
    )
  try:
    array = np.asarray(value)
  except Exception as error:  # pragma: no cover - exotic array-likes
    raise TypeError(f"{name} must be a real number; got {value!r}.") from error
  if array.shape != ():
    raise TypeError(
        f"{name} must be a scalar; got an array of shape {array.shape}. One "
        "value applies to every parameter."
    )
  if np.issubdtype(array.dtype, np.complexfloating):
    raise TypeError(f"{name} must be real; got the complex number {value!r}.")
  if not (np.issubdtype(array.dtype, np.floating)
          or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(
        f"{name} must be a real number; got {value!r} of type "
        f"{type(value).__name__}."
    )
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
  """A number in [0, 1), or a schedule with ``convention="paper"``.

  A schedule is called once here with a step count of 0, so that one that
  cannot be called with an int32 count, or that returns something other than
  a scalar in [0, 1), fails now rather than deep inside a compiled step.
  """
  if not callable(b1) or isinstance(b1, jax.core.Tracer):
    check_unit_interval("b1", b1)
    return
  if convention != "paper":
    raise ValueError(
        "A b1 schedule (the paper's beta_1t) needs convention='paper': the "
        "bias correction 1 - b1**t of the other conventions assumes a constant "
        f"b1. Got convention={convention!r}."
    )
  try:
    first = b1(jnp.zeros([], jnp.int32))
  except Exception as error:
    raise TypeError(
        "b1 is a schedule but calling it with the step count 0 (an int32 "
        f"scalar) failed: {type(error).__name__}: {error}"
    ) from error
  if jnp.shape(first) != ():
    raise TypeError(
        "b1 schedule must return a scalar; at step 0 it returned shape "
        f"{jnp.shape(first)}."
    )
  check_unit_interval("b1 schedule at step 0", first)


def check_learning_rate(learning_rate: object) -> None:
  """A finite real number, or a schedule ``count -> learning rate``."""
  if callable(learning_rate) and not isinstance(learning_rate, jax.core.Tracer):
    return
  number = _concrete_float("learning_rate", learning_rate)
  if number is not None and not math.isfinite(number):
    raise ValueError(f"learning_rate must be finite; got {number!r}.")


def check_seed(seed: object) -> None:
  """An integer in [0, 2**32): the seed of the stochastic rounding."""
  if isinstance(seed, jax.core.Tracer):
    return
  # optax.inject_hyperparams hands numeric arguments over as 0-d arrays.
  array = None
  if not isinstance(seed, (bool, np.bool_, str, bytes)):
    try:
      array = np.asarray(seed)
    except Exception:  # pragma: no cover - exotic objects
      array = None
  if (array is None or array.shape != ()
      or not np.issubdtype(array.dtype, np.integer)):
    raise TypeError(
        f"seed must be an integer in [0, 2**32); got {seed!r} of type "
        f"{type(seed).__name__}."
    )
  if not 0 <= int(array) < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32); got {seed}.")


def resolve_storage_dtype(name: str, dtype: Any) -> jnp.dtype | None:
  """``mu_dtype`` / ``nu_dtype`` as a ``jnp.dtype``: None, or a float or
  complex dtype.

  ``optax.inject_hyperparams`` hands a dtype over as an array of that dtype
  (it takes ``jnp.bfloat16`` for a number); such an array stands for its dtype.

  float16 is refused for ``nu_dtype``: the second moment holds ``|g|**2``,
  which leaves float16's range for |g| > 256 (overflow to inf, after which
  every update of that coordinate would be 0) and for |g| < 2.4e-4 (flushed to
  0). bfloat16 takes the same two bytes with float32's range.
  """
  if dtype is None:
    return None
  if isinstance(dtype, (jax.Array, np.ndarray)):
    dtype = dtype.dtype
  try:
    resolved: jnp.dtype = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(
        f"{name} must be a dtype (such as jnp.float32 or 'bfloat16') or None; "
        f"got {dtype!r}."
    ) from error
  if resolved == np.dtype(np.int8):
    # Blockwise 8-bit storage (_blockwise).
    return resolved
  if not jnp.issubdtype(resolved, jnp.inexact):
    raise TypeError(
        f"{name} must be a floating-point or complex dtype, or 'int8' for "
        f"blockwise 8-bit storage; got {resolved}."
    )
  storage_info = _dtypes.finfo(resolved)
  largest = float(storage_info.max)
  if name == "nu_dtype" and int(storage_info.maxexp) < _FLOAT32_MAXEXP:
    raise ValueError(
        f"{name}={resolved} cannot hold the second moment |g|**2: its largest "
        f"value is {largest:g}, so |g| > {largest**0.5:g} overflows (float16: "
        "|g| > 256) and small gradients underflow. Use jnp.bfloat16 (two bytes "
        "with float32's range) or jnp.float32."
    )
  return resolved


def check_decays_representable(
    decays: dict[str, object], updates: Any
) -> None:
  """Each concrete decay must stay below 1 in the arithmetic dtype of every
  leaf: ``b2 = 0.99999999`` is 1.0 in float32, where the average would not
  decay at all (and ``1 - b2**t`` computed from it is 0)."""
  compute_dtypes: dict[jnp.dtype, str] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    real = _dtypes.real_dtype(jnp.result_type(leaf))
    compute = jnp.dtype(jnp.promote_types(real, jnp.float32))
    compute_dtypes.setdefault(compute, path_name(path))
  for name, value in decays.items():
    if callable(value) or isinstance(value, jax.core.Tracer):
      continue
    number = _concrete_float(name, value)
    if number is None:
      continue
    for dtype, where in compute_dtypes.items():
      if np.asarray(number, dtype) >= 1:
        limit = float(np.nextafter(np.asarray(1.0, dtype), np.asarray(0.0, dtype)))
        raise ValueError(
            f"{name}={number!r} rounds to 1.0 in {dtype}, the arithmetic dtype "
            f"of the gradient at {where}: the moment would not decay at all. "
            f"Use {name} <= {limit!r}, or float64 parameters."
        )


# ----------------------------------------------------------------------------
# Trees.
# ----------------------------------------------------------------------------


def _leaf_dtype(path: tuple[Any, ...], leaf: Any, what: str) -> jnp.dtype:
  try:
    return jnp.dtype(jnp.result_type(leaf))
  except Exception as error:
    raise TypeError(
        f"The {what} leaf at {path_name(path)} is a {type(leaf).__name__} "
        f"({leaf!r:.80}); expected an array or a number."
    ) from error


def check_params_dtypes(tree: Any, *, what: str) -> None:
  """AMSGrad is defined for floating-point and complex leaves only."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = _leaf_dtype(path, leaf, what)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"AMSGrad needs floating-point or complex {what}; the leaf at "
          f"{path_name(path)} has dtype {dtype}. Cast it to a float dtype, or "
          "keep it out of the optimizer with optax.masked / "
          "optax.set_to_zero (see optax.multi_transform)."
      )


def _structure_difference(updates: Any, state_tree: Any) -> str:
  """Says which paths differ between the gradients and the state."""
  def kinds(tree: Any) -> dict[str, bool]:
    # path -> whether the leaf there is None
    return {
        path_name(p): leaf is None
        for p, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: x is None
        )[0]
    }

  grads, state = kinds(updates), kinds(state_tree)
  groups = {
      "in the state but not in the gradients": [p for p in state if p not in grads],
      "in the gradients but not in the state": [p for p in grads if p not in state],
      "None in the gradients where the state has an array": [
          p for p in grads if p in state and grads[p] and not state[p]
      ],
      "an array in the gradients where the state has None": [
          p for p in grads if p in state and state[p] and not grads[p]
      ],
  }
  lines = [f"  {what}: {_list_paths(paths)}" for what, paths in groups.items() if paths]
  if not lines:
    lines.append(
        "  the same paths, but different container types (for example a "
        "list against a tuple, or a dict against a NamedTuple)"
    )
  return "\n".join(lines)


def check_updates_match_state(
    updates: Any, mu: Any, *, name: str
) -> Any:
  """Checks ``updates`` against the state's ``mu`` and returns it with plain
  Python numbers turned into arrays.

  Raises a ValueError naming the paths when the structure or a shape differs,
  and a TypeError naming the path when a dtype cannot be used: integer or
  boolean gradients, or a real gradient for a complex state (and the reverse),
  which would silently drop an imaginary part.
  """
  updates_def: Any = jax.tree.structure(updates)
  state_def: Any = jax.tree.structure(mu)
  chex_checked(
      chex.assert_trees_all_equal_structs, updates, mu, error=ValueError,
      message=lambda: (
          f"{name}: the gradient tree does not match the optimizer state, which "
          "follows the params given to init.\n"
          f"{_structure_difference(updates, mu)}\n"
          f"  gradients: {updates_def}\n"
          f"  state:     {state_def}"
      ),
  )
  flat, treedef_ = jax.tree_util.tree_flatten_with_path(updates)
  treedef: Any = treedef_
  coerced = []
  for path, g in flat:
    _leaf_dtype(path, g, "gradient")  # names the path of a leaf that is no number
    # A Python number becomes an array of the default dtype, as jnp makes it.
    coerced.append(g if hasattr(g, "shape") and hasattr(g, "dtype") else jnp.asarray(g))
  coerced_tree = jax.tree.unflatten(treedef, coerced)

  def shape_message() -> str:
    errors = [
        f"  at {path_name(path)}: gradient shape {tuple(g.shape)}, expected "
        f"{tuple(m.shape)}"
        for (path, _), g, m in zip(flat, coerced, treedef.flatten_up_to(mu), strict=True)
        if tuple(g.shape) != tuple(m.shape)
    ]
    return (
        f"{name}: gradient shapes differ from the state's (which follow the "
        "params given to init):\n" + "\n".join(errors[:_MAX_LISTED])
        + (f"\n  and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else "")
    )

  chex_checked(chex.assert_trees_all_equal_shapes, coerced_tree, mu, error=ValueError,
               message=shape_message)
  for (path, _), g, m in zip(flat, coerced, treedef.flatten_up_to(mu), strict=True):
    dtype = jnp.dtype(g.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{name}: the gradient at {path_name(path)} has dtype {dtype}; "
          "AMSGrad needs floating-point or complex gradients."
      )
    g_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    m_complex = jnp.issubdtype(m.dtype, jnp.complexfloating)
    if g_complex != m_complex:
      raise TypeError(
          f"{name}: the gradient at {path_name(path)} is "
          f"{'complex' if g_complex else 'real'} ({dtype}) but its state "
          f"(mu) is {'complex' if m_complex else 'real'} ({m.dtype}); a "
          "complex and a real array cannot share moments without losing the "
          "imaginary part. Initialise the optimizer with params of the "
          "gradients' kind (a real mu_dtype for complex params also gives "
          "a real mu)."
      )
  return coerced_tree


def check_state(
    state: Any, state_type: type[Any], *, name: str
) -> None:
  """``state`` must be the ``state_type`` made by this optimizer's init, with
  ``mu``, ``nu`` and ``nu_max`` of one structure and a scalar integer count."""
  if not isinstance(state, state_type):
    found = f"{type(state).__module__}.{type(state).__qualname__}"
    hint = "Was this state made by another optimizer's init?"
    fields = getattr(state, "_fields", None)
    if fields == state_type._fields:
      hint = (
          "It has the same fields, so it may come from optax.amsgrad: "
          f"{state_type.__name__}(*state) converts it, and "
          "convention='optax' reads its nu_max (stored bias-corrected) as "
          "optax does."
      )
    elif isinstance(state, (tuple, list)) and any(
        isinstance(s, state_type) for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, state_type))
    ):
      hint = (
          f"It contains a {state_type.__name__}: pass the whole state to the "
          "update of the optimizer that made it (for example the optax.chain "
          "around this transformation)."
      )
    raise TypeError(
        f"{name}: expected a {state_type.__name__} from this optimizer's init; "
        f"got {found}. {hint}"
    )
  def inconsistent(what: str, describe: Callable[[Any], Any]) -> Callable[[], str]:
    return lambda: (
        f"{name}: the state is inconsistent: mu, nu and nu_max must have one "
        f"{what}, got\n"
        + "\n".join(f"  {field}: {describe(getattr(state, field))}"
                    for field in ("mu", "nu", "nu_max"))
    )

  # 8-bit leaves (codes and exponents) are compared as one array each.
  mu, nu, nu_max = (_blockwise.view(tree) for tree in (state.mu, state.nu, state.nu_max))
  chex_checked(chex.assert_trees_all_equal_structs, mu, nu, nu_max,
               error=ValueError, message=inconsistent("tree structure", jax.tree.structure))
  chex_checked(chex.assert_trees_all_equal_shapes, mu, nu, nu_max,
               error=ValueError,
               message=inconsistent("shape per leaf", lambda t: jax.tree.map(jnp.shape, t)))
  count = state.count

  def integer_scalar(c: Any) -> None:
    chex.assert_rank(c, 0)
    chex.assert_type(c, int)

  chex_checked(
      integer_scalar, count, error=TypeError,
      message=lambda: (
          f"{name}: state.count must be an integer scalar; got "
          f"{jnp.result_type(count)} of shape {jnp.shape(count)}."
      ),
  )


def resolve_b1(b1: float | jax.Array | Callable[[jax.Array], jax.Array],
               count: jax.Array) -> jax.Array:
  """The decay of the first moment at this step (the paper's beta_1t)."""
  value = jnp.asarray(b1(count) if callable(b1) else b1)
  if value.shape != ():
    raise TypeError(f"b1 must be a scalar at every step; got shape {value.shape}.")
  return value
