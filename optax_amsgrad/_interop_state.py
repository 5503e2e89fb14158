"""The state side of interop: matching a framework's parameters to the leaves
of ``params`` (order, layouts, shapes), writing moments into a solver's own
``init``, and reading the moments out of a state made here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Narrow state (bfloat16 moments, 8-bit blocks) is written through the storage
# functions of the solver's own steps, so that a state moved in is rounded as
# one made here; a state moved out is read as the step reads it.
from optax_amsgrad import _blockwise, _decode, _rounding, _transform

Layouts = Any  # a tree shaped like the params: None or a tuple of axes per leaf
_COUNT_MAX = 2**31 - 1  # count is an int32 that saturates


class _Moments(NamedTuple):
  """One parameter's moments in the params' layout."""

  mu: Any  # NumPy arrays moving in, the state's arrays moving out
  nu: Any
  nu_max: Any


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def _is_state_leaf(node: Any) -> bool:
  """A leaf of a moment's tree: an 8-bit block leaf counts as one."""
  return _is_masked(node) or _blockwise.is_quantized(node)


def _is_amsgrad_state(node: Any) -> bool:
  return isinstance(node, _transform.ScaleByAmsgradState)


def _numpy(value: Any) -> np.ndarray:
  """A torch tensor (on any device), a Keras variable or an array as NumPy;
  16-bit floats widen to float32."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.dtype.is_floating_point and value.element_size() < 4:
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  if array.dtype.kind == "V" or (array.dtype.kind == "f" and array.dtype.itemsize < 4):
    array = array.astype(np.float32)  # bfloat16 (ml_dtypes) and float16
  return array


def _float(name: str, value: Any) -> float:
  if callable(value):
    raise NotImplementedError(
        f"{name} is the callable {value!r}; only constant hyperparameters move "
        "between frameworks."
    )
  return float(_numpy(value))


# --- Matching the framework's parameters to the leaves of ``params`` --------


class _Plan(NamedTuple):
  """Leaf ``i`` of the params is the framework's parameter ``order[i]``, with
  ``leaf = framework_tensor.transpose(axes[i])`` where ``axes[i]`` is not
  None."""

  treedef: Any
  paths: list[str]
  shapes: list[tuple[int, ...]]
  complex: list[bool]
  order: list[int]
  axes: list[tuple[int, ...] | None]


def _plan(
    leaves_with_paths: Sequence[tuple[Any, Any]],
    treedef: Any,
    count: int,
    what: str,
    order: Sequence[int] | None,
    layouts: Layouts,
) -> _Plan:
  n = len(leaves_with_paths)
  if count != n:
    raise ValueError(
        f"The {what} has {count} parameters but params has {n} leaves; they are "
        "matched by position (leaf i of params is parameter order[i])."
    )
  if order is None:
    order = list(range(n))
  else:
    order = [int(j) for j in order]
    if sorted(order) != list(range(n)):
      raise ValueError(
          f"order must be a permutation of range({n}) (order[i] is the {what}'s "
          f"parameter for leaf i of params); got {order}."
      )
  if layouts is None:
    axes: list[Any] = [None] * n
  else:
    try:
      axes = treedef.flatten_up_to(layouts)
    except (ValueError, TypeError) as error:
      raise ValueError(
          "layouts must be a tree shaped like params with, for each leaf, None or "
          f"a tuple of axes: {error}"
      ) from error
  paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
  shapes = [tuple(np.shape(leaf)) for _, leaf in leaves_with_paths]
  for i, a in enumerate(axes):
    if a is None:
      continue
    if not isinstance(a, (tuple, list)) or sorted(int(x) for x in a) != list(
        range(len(shapes[i]))
    ):
      raise ValueError(
          f"layouts for params leaf {i} ({paths[i]}, shape {shapes[i]}) must be None "
          f"or a permutation of range({len(shapes[i])}); got {a!r}."
      )
    axes[i] = tuple(int(x) for x in a)
  is_complex = [bool(jnp.iscomplexobj(leaf)) for _, leaf in leaves_with_paths]
  return _Plan(treedef, paths, shapes, is_complex, order, axes)


def _check_shape(plan: _Plan, i: int, framework_shape: tuple[int, ...], what: str) -> None:
  axes = plan.axes[i]
  j = plan.order[i]
  moved = framework_shape if axes is None else tuple(framework_shape[a] for a in axes)
  if len(framework_shape) != len(plan.shapes[i]) or moved != plan.shapes[i]:
    after = "" if axes is None else f" ({moved} after layout {axes})"
    raise ValueError(
        f"Parameter {j} of the {what} has shape {framework_shape}{after}, but params "
        f"leaf {i} ({plan.paths[i]}) has shape {plan.shapes[i]}."
    )


def _check_complex(plan: _Plan, i: int, framework_complex: bool, what: str) -> None:
  if framework_complex != plan.complex[i]:
    kinds = {True: "complex", False: "real"}
    raise NotImplementedError(
        f"Parameter {plan.order[i]} of the {what} is {kinds[framework_complex]} but "
        f"params leaf {i} ({plan.paths[i]}) is {kinds[plan.complex[i]]}: the moments' "
        "layouts differ (a complex number is not a pair of reals), which is not "
        "supported."
    )


def _to_params_layout(value: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
  return value if axes is None else np.transpose(value, axes)


def _to_framework_layout(value: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
  return value if axes is None else np.ascontiguousarray(np.transpose(value, np.argsort(axes)))


# --- Writing a state into the solver's own init ------------------------------


def _placed(value: jax.Array, template: jax.Array) -> jax.Array:
  """``value`` placed as ``template`` is: on its sharding when committed, on
  the default device, uncommitted, otherwise (so a jitted step sees the
  same placement as with ``init``'s state and does not compile again)."""
  if getattr(template, "committed", False):
    placed: jax.Array = jax.device_put(value, template.sharding)
    return placed
  return value


def _stored(
    value: np.ndarray,
    template: Any,
    compute_dtype: Any,
    *,
    buffer: str,
    stochastic: bool,
    seed: int,
    count: int,
    leaf_index: int,
    at_least: Any = None,
) -> Any:
  """``value`` in the storage of ``template``, rounded as the solver's steps
  store it: ``mu`` and ``nu`` stochastically (when narrowing, with
  ``state_rounding="stochastic"``), ``nu_max`` to nearest,
  never below the stored ``nu`` (``at_least``)."""
  x = jnp.asarray(value, compute_dtype)
  keys = _rounding.stream_keys(seed, count, leaf_index)
  if _blockwise.is_quantized(template):
    if buffer == "nu_max":
      # The step's monotone rule: the maximum of the stored nu too, under
      # scales at least the template's (init's, at the floor).
      floor = _blockwise.decoded(at_least, "nu") if at_least is not None else x
      quantized = _blockwise.store_max(jnp.maximum(x, floor.astype(x.dtype)), template)
    else:
      quantized = _blockwise.store(x, buffer, stochastic=stochastic, keys=keys)
    return _blockwise.Quantized(_placed(quantized.codes, template.codes),
                                _placed(quantized.exponents, template.exponents))
  if buffer == "nu_max":
    if at_least is not None:
      at_least = _blockwise.decoded(at_least, "nu")
    stored = _rounding.store_max(x, template.dtype, stochastic=stochastic, at_least=at_least)
  else:
    stored = _rounding.store(x, template.dtype, stochastic=stochastic, buffer=buffer, keys=keys)
  return _placed(stored, template)


def _compute_dtype(param: Any) -> Any:
  return jnp.promote_types(jnp.result_type(param), jnp.float32)


def _filled(
    solver: optax.GradientTransformation,
    params: optax.Params,
    moments: list[_Moments] | None,
    count: int,
    *,
    stochastic: bool,
    seed: int,
) -> optax.OptState:
  """``solver.init(params)`` with every AMSGrad state holding ``moments``
  (per leaf of ``params``; zeros when None) and every step count ``count``."""
  template = solver.init(params)
  param_leaves = jax.tree.leaves(params)
  count = min(count, _COUNT_MAX)

  def placed_count(old: jax.Array) -> jax.Array:
    return _placed(jnp.asarray(count, old.dtype), old)

  def fill(node: Any) -> Any:
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=placed_count(node.count))
    if not _is_amsgrad_state(node):
      return node
    trees = [jax.tree.flatten(getattr(node, f), is_leaf=_is_state_leaf)
             for f in ("mu", "nu", "nu_max")]
    (mus, treedef_), (nus, _), (nu_maxes, _) = trees
    treedef: Any = treedef_  # PyTreeDef's stubs lack unflatten
    assert len(mus) == len(param_leaves)
    position = 0  # the leaf's position among this transformation's leaves
    for i, (mu, nu, nu_max) in enumerate(zip(mus, nus, nu_maxes, strict=True)):
      if _is_masked(mu) or moments is None:
        continue
      dtype = _compute_dtype(param_leaves[i])
      options: dict[str, Any] = {"stochastic": stochastic, "seed": seed, "count": count,
                                 "leaf_index": position}
      mus[i] = _stored(moments[i].mu, mu, dtype, buffer="mu", **options)
      nus[i] = _stored(moments[i].nu, nu, dtype, buffer="nu", **options)
      nu_maxes[i] = _stored(moments[i].nu_max, nu_max, dtype, buffer="nu_max",
                            at_least=nus[i], **options)
      position += 1
    return node._replace(
        count=placed_count(node.count),
        mu=treedef.unflatten(mus),
        nu=treedef.unflatten(nus),
        nu_max=treedef.unflatten(nu_maxes),
    )

  return jax.tree.map(
      fill, template,
      is_leaf=lambda x: _is_amsgrad_state(x) or isinstance(x, optax.ScaleByScheduleState),
  )


# --- Reading a state made here ------------------------------------------------


class _Collected(NamedTuple):
  step_count: int
  moments: list[_Moments]  # as the step reads them (decode_state's values)
  stored: list[_Moments]  # as the state stores them (8-bit blocks, narrow floats)
  plan_leaves: list[tuple[Any, Any]]  # (path, decoded mu leaf) per leaf of the params
  treedef: Any


def _collected(opt_state: optax.OptState) -> _Collected:
  """The step count and the per-leaf moments of the AMSGrad states in
  ``opt_state`` (one, or one per group of an ``optax.partition``), both as
  stored and as :func:`~optax_amsgrad.decode_state` reads them."""
  nodes = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_amsgrad_state)
           if _is_amsgrad_state(node)]
  if not nodes:
    foreign = [node for node in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAmsgradState))
               if isinstance(node, optax.ScaleByAmsgradState)]
    hint = (" It holds optax.amsgrad's state, whose nu_max is bias-corrected: it "
            "continues under amsgrad(convention='optax') (see from_optax) but "
            "has no exact PyTorch or Keras equivalent.") if foreign else ""
    raise TypeError(
        "opt_state holds no optax_amsgrad.ScaleByAmsgradState: pass the state of "
        f"an optax_amsgrad solver (amsgrad, amsgradw, or a chain or partition of them).{hint}"
    )
  counts = sorted({int(node.count) for node in nodes})
  if len(counts) > 1:
    raise ValueError(
        f"Mixed steps: the AMSGrad states in opt_state have step counts {counts}; "
        "PyTorch and Keras continue with one step count for all parameters."
    )
  covered: list[tuple[_Moments, _Moments] | None] | None = None
  first: list[tuple[Any, Any]] = []
  treedef: Any = None
  for node in nodes:
    decoded = _decode.decode_state(node)
    path_leaves, treedef_here = jax.tree_util.tree_flatten_with_path(
        decoded.mu, is_leaf=_is_masked)
    stored_leaves, decoded_leaves = (
        [jax.tree.leaves(getattr(state, f), is_leaf=_is_state_leaf)
         for f in ("mu", "nu", "nu_max")] for state in (node, decoded))
    if covered is None:
      covered = [None] * len(path_leaves)
      first = list(path_leaves)
      treedef = treedef_here
    if treedef_here != treedef:
      raise ValueError(
          "The AMSGrad states in opt_state are over different trees:\n"
          f"  {treedef}\n  {treedef_here}"
      )
    for i, (path, mu) in enumerate(path_leaves):
      if _is_masked(mu):
        continue
      if covered[i] is not None:
        raise ValueError(f"Leaf {i} ({jax.tree_util.keystr(path)}) has two AMSGrad states.")
      covered[i] = (_Moments(*(leaves[i] for leaves in decoded_leaves)),
                    _Moments(*(leaves[i] for leaves in stored_leaves)))
      first[i] = (path, mu)
  assert covered is not None
  missing = [i for i, m in enumerate(covered) if m is None]
  if missing:
    raise ValueError(f"Leaves {missing} of opt_state have no AMSGrad state.")
  pairs = [m for m in covered if m is not None]
  return _Collected(counts[0], [m for m, _ in pairs], [s for _, s in pairs], first, treedef)


def _state_numpy(value: jax.Array) -> np.ndarray:
  """A decoded state leaf as NumPy (float32 at least)."""
  return _numpy(jax.device_get(value))


def _check_state_complex(collected: _Collected, plan: _Plan, i: int, what: str) -> None:
  """Complex params under a convention that keeps ``|g|**2`` as one real
  second moment: the framework keeps one per real coordinate."""
  if plan.complex[i] and not jnp.iscomplexobj(collected.moments[i].nu):
    raise NotImplementedError(
        f"Leaf {i} ({plan.paths[i]}) is complex and its nu is real (|g|**2, one value "
        f"per complex entry), whose layout differs from the {what}'s (one value per "
        "real coordinate); only convention='pytorch' states of complex params move."
    )
