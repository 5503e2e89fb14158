"""Moving a running AMSGrad between PyTorch, Keras and JAX, state and all.

A training run under way in ``torch.optim.Adam/AdamW(amsgrad=True)`` or in
Keras 3 ``Adam/AdamW(amsgrad=True)`` continues in JAX on the trajectory it
would have followed in its own framework, and back:

- :func:`from_torch` reads a torch optimizer's ``state_dict()`` and returns
  the matching solver (convention ``"pytorch"``) and its state;
  :func:`to_torch` writes a state back as a ``state_dict`` for
  ``torch_optimizer.load_state_dict``.
- :func:`from_keras` and :func:`to_keras` do the same with a Keras optimizer
  (convention ``"keras"``).
- :func:`from_optax` and :func:`to_optax` convert the state of
  ``optax.amsgrad``, which continues unchanged under
  ``amsgrad(convention="optax")``.

The state maps one to one: PyTorch's ``exp_avg``, ``exp_avg_sq`` and
``max_exp_avg_sq`` (Keras' ``momentums``, ``velocities`` and
``velocity_hats``) are ``mu``, ``nu`` and ``nu_max``, and the number of steps
taken (PyTorch's ``step``, Keras' ``iterations``) is ``count``. Both frameworks
keep the raw maximum ``max(v)``, as the ``"pytorch"`` and ``"keras"``
conventions do. torch and keras are imported only by the functions that need
them.

Parameters are matched by position: leaf ``i`` of ``params`` (in
``jax.tree.leaves`` order) is the framework's parameter ``order[i]`` (by
default ``i``; PyTorch's order is that of its param groups, one after the
other, Keras' that of the variables the optimizer was built on). A leaf whose
layout differs takes a permutation of axes in ``layouts``, ``leaf =
framework_tensor.permute(axes)``; a ``torch.nn.Linear`` weight ``(out, in)``
for a Flax ``Dense`` kernel ``(in, out)`` is ``(1, 0)``. The state moves
exactly as the params do.

Example, with the state dict of ``torch.optim.Adam([w], lr=0.1,
amsgrad=True)`` after one step with gradient ``[2, -1]`` (written out here so
that the example runs without torch):

>>> import numpy as np
>>> import optax_amsgrad
>>> state_dict = {
...     "state": {0: {"step": np.float32(1.0),
...                   "exp_avg": np.array([0.2, -0.1], np.float32),
...                   "exp_avg_sq": np.array([0.004, 0.001], np.float32),
...                   "max_exp_avg_sq": np.array([0.004, 0.001], np.float32)}},
...     "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8,
...                       "weight_decay": 0, "amsgrad": True, "maximize": False,
...                       "decoupled_weight_decay": False, "params": [0]}],
... }
>>> solver, state = optax_amsgrad.from_torch(state_dict, {"w": np.zeros(2, np.float32)})
>>> int(state[0].count), state[0].nu_max["w"]
(1, Array([0.004, 0.001], dtype=float32))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Narrow state (bfloat16 moments) is written through the storage functions of
# the solver's own steps, so that a state moved in is rounded as one made here.
from optax_amsgrad import _alias, _rounding, _transform

Layouts = Any  # a tree shaped like the params: None or a tuple of axes per leaf
_COUNT_MAX = 2**31 - 1  # count is an int32 that saturates
_TORCH_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _Moments(NamedTuple):
  """One parameter's moments in the params' layout."""

  mu: Any  # NumPy arrays moving in, the state's arrays moving out
  nu: Any
  nu_max: Any


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


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
    template: jax.Array,
    compute_dtype: Any,
    *,
    buffer: str,
    stochastic: bool,
    seed: int,
    count: int,
    leaf_index: int,
    at_least: jax.Array | None = None,
) -> jax.Array:
  """``value`` in the storage dtype of ``template``, rounded as the solver's
  steps store it: ``mu`` and ``nu`` stochastically (when narrowing, with
  ``state_rounding="stochastic"``), ``nu_max`` to nearest, never below the
  stored ``nu``."""
  x = jnp.asarray(value, compute_dtype)
  if buffer == "nu_max":
    stored = _rounding.store_max(x, template.dtype, stochastic=stochastic, at_least=at_least)
  else:
    stored = _rounding.store(
        x, template.dtype, stochastic=stochastic, buffer=buffer,
        keys=_rounding.stream_keys(seed, count, leaf_index),
    )
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
    trees = [jax.tree.flatten(getattr(node, f), is_leaf=_is_masked)
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
  moments: list[_Moments]
  plan_leaves: list[tuple[Any, Any]]  # (path, mu leaf) per leaf of the params
  treedef: Any


def _collected(opt_state: optax.OptState) -> _Collected:
  """The step count and the per-leaf moments of the AMSGrad states in
  ``opt_state`` (one, or one per group of an ``optax.partition``)."""
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
  covered: list[_Moments | None] | None = None
  first: list[tuple[Any, Any]] = []
  treedef: Any = None
  for node in nodes:
    path_leaves, treedef_here = jax.tree_util.tree_flatten_with_path(node.mu, is_leaf=_is_masked)
    nus, nu_maxes = (jax.tree.leaves(getattr(node, f), is_leaf=_is_masked)
                     for f in ("nu", "nu_max"))
    if covered is None:
      covered = [None] * len(path_leaves)
      first = list(path_leaves)
      treedef = treedef_here
    if treedef_here != treedef:
      raise ValueError(
          "The AMSGrad states in opt_state are over different trees:\n"
          f"  {treedef}\n  {treedef_here}"
      )
    for i, ((path, mu), nu, nu_max) in enumerate(
        zip(path_leaves, nus, nu_maxes, strict=True)):
      if _is_masked(mu):
        continue
      if covered[i] is not None:
        raise ValueError(f"Leaf {i} ({jax.tree_util.keystr(path)}) has two AMSGrad states.")
      covered[i] = _Moments(mu, nu, nu_max)
      first[i] = (path, mu)
  assert covered is not None
  missing = [i for i, m in enumerate(covered) if m is None]
  if missing:
    raise ValueError(f"Leaves {missing} of opt_state have no AMSGrad state.")
  return _Collected(counts[0], [m for m in covered if m is not None], first, treedef)


def _state_numpy(value: jax.Array) -> np.ndarray:
  """A state leaf as NumPy; narrow floats (bfloat16 moments) widen to float32."""
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


# --- PyTorch ------------------------------------------------------------------


def _lr_or_override(
    learning_rate: Any, index: int, count: int
) -> optax.ScalarOrSchedule | None:
  if learning_rate is None:
    return None
  if isinstance(learning_rate, Sequence) and not isinstance(learning_rate, str):
    if len(learning_rate) != count:
      raise ValueError(
          f"learning_rate has {len(learning_rate)} entries for {count} param groups."
      )
    return learning_rate[index]
  return learning_rate


def _torch_groups(state_dict: Any) -> list[Mapping[str, Any]]:
  if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
    keys = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else None
    raise TypeError(
        "Expected the state_dict() of a torch.optim.Adam or AdamW optimizer, a "
        "mapping with 'state' and 'param_groups'; got "
        + (f"a mapping with keys {keys}." if keys is not None else f"{type(state_dict)}.")
    )
  groups = list(state_dict["param_groups"])
  for g, group in enumerate(groups):
    if "amsgrad" in group and not group["amsgrad"]:
      raise ValueError(
          f"Param group {g} has amsgrad=False: the state dict is plain Adam's, "
          "which keeps no max_exp_avg_sq. Train with amsgrad=True to move the run."
      )
    missing = [k for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")
               if k not in group]
    if missing:
      raise ValueError(
          f"Param group {g} has no {', '.join(missing)} (it has {sorted(group)}): "
          "not the state dict of torch.optim.Adam or AdamW."
      )
    if group.get("maximize", False):
      raise NotImplementedError(
          f"Param group {g} has maximize=True, which is not supported: minimise "
          "the negated objective instead."
      )
  return groups


def from_torch(
    state_dict: Mapping[str, Any],
    params: optax.Params,
    *,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
    learning_rate: optax.ScalarOrSchedule | Sequence[optax.ScalarOrSchedule] | None = None,
    decoupled_weight_decay: bool | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    state_rounding: _transform.StateRounding = "stochastic",
    seed: int = 0,
) -> tuple[optax.GradientTransformation, optax.OptState]:
  """The solver and state that continue a ``torch.optim.Adam/AdamW(amsgrad=True)`` run.

  The solver is built from the state dict's hyperparameters with
  ``convention="pytorch"``: ``AdamW`` becomes :func:`amsgradw`, ``Adam`` with
  ``weight_decay`` the coupled ``optax.chain(optax.add_decayed_weights(wd),
  amsgrad(...))``, ``Adam`` without it :func:`amsgrad`; several param groups
  become an ``optax.partition`` over the leaves, labelled by group index.
  The state is ``solver.init(params)`` holding the optimizer's moments and
  step, placed as ``init`` places it (on each param's sharding), so a jitted
  step compiles once for both.

  Example (``torch_optimizer`` a ``torch.optim.Adam(amsgrad=True)`` over a
  ``torch.nn.Linear``, ``params = {"kernel": ..., "bias": ...}`` the same
  weights in Flax's layout, whose leaves come in the order bias, kernel)::

    solver, state = optax_amsgrad.from_torch(
        torch_optimizer.state_dict(), params,
        order=[1, 0],                            # bias is torch's parameter 1
        layouts={"bias": None, "kernel": (1, 0)},  # (out, in) -> (in, out)
    )

  Args:
    state_dict: ``torch_optimizer.state_dict()``, before or after the first
      step, or one read back with ``torch.load``; tensors may live on any
      device.
    params: the parameters, a pytree whose ``jax.tree.leaves`` are the
      optimizer's parameters (in the order of ``order``).
    order: ``order[i]`` is the optimizer's parameter for leaf ``i`` of
      ``params`` (counting through the param groups); by default ``i``.
    layouts: a tree shaped like ``params`` holding, per leaf, None or a
      permutation ``axes`` with ``leaf = torch_tensor.permute(axes)``.
    learning_rate: overrides the groups' ``lr`` (one value, or one per group):
      a float or an Optax schedule, called with the number of steps taken.
      Required when an LR scheduler drives the optimizer (its param groups
      hold ``initial_lr``), since the scheduler does not travel in the state.
    decoupled_weight_decay: whether the weight decay is ``AdamW``'s; read
      from the state dict (PyTorch 2.6 and later record it), needed only for
      state dicts of older versions with ``weight_decay`` set.
    mu_dtype: storage dtype of ``mu``, as in :func:`amsgrad`.
    nu_dtype: storage dtype of ``nu`` and ``nu_max``. Values narrower than the
      optimizer's are rounded as the solver's steps store them.
    state_rounding: ``"stochastic"`` or ``"nearest"``, as in :func:`amsgrad`.
    seed: seed of the stochastic rounding.

  Returns:
    ``(solver, opt_state)``.

  Raises:
    TypeError: ``state_dict`` is not an optimizer's state dict.
    ValueError: not ``Adam/AdamW(amsgrad=True)``'s state, a parameter count or
      shape that does not match ``params``, mixed steps across parameters, a
      bad ``order`` or ``layouts``, an LR scheduler without ``learning_rate``.
    NotImplementedError: ``maximize=True``; complex parameters against real
      leaves (or the reverse).
  """
  groups = _torch_groups(state_dict)
  ids = [pid for group in groups for pid in group["params"]]
  group_of = [g for g, group in enumerate(groups) for _ in group["params"]]
  leaves_with_paths, treedef_ = jax.tree_util.tree_flatten_with_path(params)
  treedef: Any = treedef_  # PyTreeDef's stubs lack unflatten
  what = "torch optimizer's state dict"
  plan = _plan(leaves_with_paths, treedef, len(ids), what, order, layouts)

  # The step: one for all parameters, or none yet.
  entries = [state_dict["state"].get(pid) for pid in ids]
  steps: dict[float, int] = {}
  for j, entry in enumerate(entries):
    if entry is None:
      continue
    missing = [k for k in _TORCH_STATE_KEYS if k not in entry]
    if missing:
      raise ValueError(
          f"The state of parameter {j} has no {', '.join(missing)} (it has "
          f"{sorted(entry)}): not the state of an AMSGrad optimizer "
          "(torch.optim.Adam/AdamW with amsgrad=True)."
      )
    steps.setdefault(float(_numpy(entry["step"])), j)
  fresh = [j for j, entry in enumerate(entries) if entry is None]
  if len(steps) > 1 or (steps and fresh):
    found = [f"parameter {j} has step {s:g}" for s, j in steps.items()]
    if fresh:
      found.append(f"parameters {fresh} have not been stepped")
    raise ValueError(
        f"Mixed steps: {'; '.join(found)}. AMSGrad in JAX keeps one step count for "
        "all parameters (in PyTorch, parameters without gradients skip steps)."
    )
  count = 0
  if steps:
    step = next(iter(steps))
    if step < 0 or step != int(step):
      raise ValueError(f"The step {step} is not a whole number of steps.")
    count = int(step)

  moments: list[_Moments] | None = None
  if steps:
    moments = []
    for i, j in enumerate(plan.order):
      entry = entries[j]
      assert entry is not None
      values = [_numpy(entry[k]) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
      for value in values:
        _check_shape(plan, i, value.shape, what)
      _check_complex(plan, i, np.iscomplexobj(values[0]), what)
      moments.append(_Moments(*(_to_params_layout(v, plan.axes[i]) for v in values)))

  # The solver, group by group.
  transforms = []
  options: dict[str, Any] = {"convention": "pytorch", "mu_dtype": mu_dtype, "nu_dtype": nu_dtype,
             "state_rounding": state_rounding, "seed": seed}
  for g, group in enumerate(groups):
    lr = _lr_or_override(learning_rate, g, len(groups))
    if lr is None:
      if "initial_lr" in group:
        raise ValueError(
            f"Param group {g} has initial_lr: an LR scheduler drives this "
            "optimizer, and schedulers do not travel in the state dict. Pass "
            f"learning_rate=: the current lr ({_float('lr', group['lr'])!r}) to keep "
            "it constant, or an Optax schedule of the step count."
        )
      lr = _float("lr", group["lr"])
    b1, b2 = (_float(f"betas[{k}]", b) for k, b in enumerate(group["betas"]))
    eps = _float("eps", group["eps"])
    wd = _float("weight_decay", group["weight_decay"])
    decoupled = group.get("decoupled_weight_decay", decoupled_weight_decay)
    if decoupled is None:
      if wd != 0:
        raise ValueError(
            f"Param group {g} has weight_decay={wd} but the state dict does not "
            "say whether it is Adam's (coupled) or AdamW's (decoupled): pass "
            "decoupled_weight_decay=True for AdamW, False for Adam."
        )
      decoupled = False
    if decoupled:
      transforms.append(_alias.amsgradw(lr, b1, b2, eps, weight_decay=wd, **options))
    elif wd != 0:
      transforms.append(optax.chain(
          optax.add_decayed_weights(wd), _alias.amsgrad(lr, b1, b2, eps, **options)
      ))
    else:
      transforms.append(_alias.amsgrad(lr, b1, b2, eps, **options))
  solver: optax.GradientTransformation
  if len(transforms) == 1:
    solver = transforms[0]
  else:
    labels = treedef.unflatten([group_of[j] for j in plan.order])
    solver = optax.partition(dict(enumerate(transforms)), labels)
  opt_state = _filled(solver, params, moments, count,
                      stochastic=state_rounding == "stochastic", seed=seed)
  return solver, opt_state


def to_torch(
    opt_state: optax.OptState,
    torch_optimizer: Any,
    *,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
) -> dict[str, Any]:
  """A state dict for ``torch_optimizer.load_state_dict`` that continues ``opt_state``.

  ``torch_optimizer`` is a ``torch.optim.Adam`` or ``AdamW`` with
  ``amsgrad=True`` built on the parameters that correspond to the leaves of
  the state (typically the JAX params copied into a torch model); it gives the
  hyperparameters, which :func:`from_torch` reads back. ``opt_state`` is the
  state of an ``optax_amsgrad`` solver with ``convention="pytorch"`` (or
  ``"keras"`` or ``"paper"``, whose state means the same; not ``"optax"``,
  whose ``nu_max`` is bias-corrected). Narrow moments are widened to the
  parameters' dtype.

  Example::

    torch_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    torch_optimizer.load_state_dict(optax_amsgrad.to_torch(opt_state, torch_optimizer))

  Args:
    opt_state: the state of an ``optax_amsgrad`` solver: :func:`amsgrad`,
      :func:`amsgradw`, or chains and ``optax.partition`` of them.
    torch_optimizer: the ``torch.optim.Adam/AdamW(amsgrad=True)`` to continue.
    order: as in :func:`from_torch`.
    layouts: as in :func:`from_torch`, a tree shaped like the params.

  Returns:
    The state dict, with the optimizer's own param groups.

  Raises:
    TypeError: not a torch Adam or AdamW; no AMSGrad state in ``opt_state``.
    ValueError: ``amsgrad=False``, a parameter count or shape that does not
      match, mixed steps across the state's groups.
    NotImplementedError: ``maximize=True``; complex parameters whose second
      moment is kept as ``|g|**2``, or complex against real.
  """
  import torch

  if not isinstance(torch_optimizer, torch.optim.Adam):
    raise TypeError(
        "torch_optimizer must be a torch.optim.Adam or AdamW (with amsgrad=True); "
        f"got {type(torch_optimizer).__qualname__}."
    )
  template = torch_optimizer.state_dict()
  _torch_groups(template)
  tensors = [p for group in torch_optimizer.param_groups for p in group["params"]]
  ids = [pid for group in template["param_groups"] for pid in group["params"]]
  collected = _collected(opt_state)
  what = "torch optimizer"
  plan = _plan(collected.plan_leaves, collected.treedef, len(ids), what, order, layouts)
  state: dict[Any, Any] = {}
  step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
  for i, j in enumerate(plan.order):
    tensor = tensors[j]
    _check_shape(plan, i, tuple(tensor.shape), what)
    _check_complex(plan, i, bool(tensor.is_complex()), what)
    _check_state_complex(collected, plan, i, what)
    if collected.step_count == 0:
      continue  # PyTorch has no state before the first step.

    def torch_tensor(value: Any, like: Any = tensor, axes: Any = plan.axes[i]) -> Any:
      array = _to_framework_layout(_state_numpy(value), axes)
      return torch.from_numpy(np.array(array)).to(dtype=like.dtype, device=like.device)

    mu, nu, nu_max = collected.moments[i]
    state[ids[j]] = {
        "step": torch.tensor(float(collected.step_count), dtype=step_dtype),
        "exp_avg": torch_tensor(mu),
        "exp_avg_sq": torch_tensor(nu),
        "max_exp_avg_sq": torch_tensor(nu_max),
    }
  return {"state": state, "param_groups": template["param_groups"]}


# --- Keras --------------------------------------------------------------------


def _keras_adam(keras_optimizer: Any) -> Any:
  import keras

  if not isinstance(keras_optimizer, keras.optimizers.Adam):
    inner = getattr(keras_optimizer, "inner_optimizer", None)
    hint = " Pass its inner_optimizer." if inner is not None else ""
    raise TypeError(
        "keras_optimizer must be a keras.optimizers.Adam or AdamW (with "
        f"amsgrad=True); got {type(keras_optimizer).__qualname__}.{hint}"
    )
  if not keras_optimizer.amsgrad:
    raise ValueError(
        "keras_optimizer has amsgrad=False: plain Adam keeps no velocity_hats. "
        "Train with amsgrad=True to move the run."
    )
  for option in ("clipnorm", "clipvalue", "global_clipnorm", "gradient_accumulation_steps"):
    if getattr(keras_optimizer, option, None) is not None:
      raise NotImplementedError(
          f"keras_optimizer has {option}={getattr(keras_optimizer, option)!r}, which "
          "is not supported: only the AMSGrad step and its weight decay move."
      )
  if getattr(keras_optimizer, "use_ema", False):
    raise NotImplementedError(
        "keras_optimizer has use_ema=True, which is not supported: the moving "
        "average of the weights does not move."
    )
  return keras


def from_keras(
    keras_optimizer: Any,
    params: optax.Params,
    *,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    state_rounding: _transform.StateRounding = "stochastic",
    seed: int = 0,
) -> tuple[optax.GradientTransformation, optax.OptState]:
  """The solver and state that continue a Keras 3 ``Adam/AdamW(amsgrad=True)`` run.

  The solver has ``convention="keras"``: :func:`amsgrad`, or :func:`amsgradw`
  when the optimizer has a ``weight_decay`` (Keras decays ``Adam`` and
  ``AdamW`` alike, decoupled), masked as ``exclude_from_weight_decay`` says.
  The learning rate is the optimizer's float32 value. The state is
  ``solver.init(params)`` holding the optimizer's ``momentums``,
  ``velocities``, ``velocity_hats`` and ``iterations``.

  Example::

    solver, state = optax_amsgrad.from_keras(model.optimizer, params)

  Args:
    keras_optimizer: a built Keras 3 ``Adam`` or ``AdamW`` with
      ``amsgrad=True`` (an unbuilt one has taken no step: the state is zero).
    params: the parameters, whose ``jax.tree.leaves`` are the variables the
      optimizer was built on (in the order of ``order``).
    order: ``order[i]`` is the optimizer's variable for leaf ``i``.
    layouts: as in :func:`from_torch`.
    learning_rate: overrides the optimizer's learning rate: a float or an Optax
      schedule of the number of steps taken. Required when the optimizer's
      learning rate is a schedule.
    mu_dtype: storage dtype of ``mu``.
    nu_dtype: storage dtype of ``nu`` and ``nu_max``.
    state_rounding: ``"stochastic"`` or ``"nearest"``.
    seed: seed of the stochastic rounding.

  Returns:
    ``(solver, opt_state)``.

  Raises:
    TypeError: not a Keras ``Adam`` or ``AdamW``.
    ValueError: ``amsgrad=False``, a variable count or shape that does not match
      ``params``, a bad ``order`` or ``layouts``, a learning-rate schedule
      without ``learning_rate``.
    NotImplementedError: gradient clipping, gradient accumulation, EMA,
      callable hyperparameters, complex variables.
  """
  keras = _keras_adam(keras_optimizer)
  leaves_with_paths, treedef_ = jax.tree_util.tree_flatten_with_path(params)
  treedef: Any = treedef_  # PyTreeDef's stubs lack unflatten
  built = keras_optimizer.built
  variables = list(keras_optimizer._trainable_variables) if built else []
  what = "Keras optimizer"
  count_fw = len(variables) if built else len(leaves_with_paths)
  plan = _plan(leaves_with_paths, treedef, count_fw, what, order, layouts)
  count = int(_numpy(keras_optimizer.iterations)) if built else 0
  moments: list[_Moments] | None = None
  if built:
    moments = []
    for i, j in enumerate(plan.order):
      _check_shape(plan, i, tuple(variables[j].shape), what)
      _check_complex(plan, i, "complex" in str(variables[j].dtype), what)
      if plan.complex[i]:
        raise NotImplementedError(
            f"params leaf {i} ({plan.paths[i]}) is complex: Keras' AMSGrad is for "
            "real variables."
        )
      values = [_numpy(buffers[j].value) for buffers in (
          keras_optimizer._momentums, keras_optimizer._velocities,
          keras_optimizer._velocity_hats)]
      moments.append(_Moments(*(_to_params_layout(v, plan.axes[i]) for v in values)))

  lr: optax.ScalarOrSchedule | None = learning_rate
  if lr is None:
    schedule = keras_optimizer._learning_rate
    if not isinstance(schedule, keras.Variable):
      raise ValueError(
          f"keras_optimizer's learning rate is {schedule!r}, a schedule, which "
          "does not travel: pass learning_rate= (an Optax schedule of the step "
          "count, or a float)."
      )
    lr = float(_numpy(schedule.value))
  b1 = _float("beta_1", keras_optimizer.beta_1)
  b2 = _float("beta_2", keras_optimizer.beta_2)
  eps = _float("epsilon", keras_optimizer.epsilon)
  options: dict[str, Any] = {"convention": "keras", "mu_dtype": mu_dtype, "nu_dtype": nu_dtype,
             "state_rounding": state_rounding, "seed": seed}
  wd = keras_optimizer.weight_decay
  solver: optax.GradientTransformation
  if wd is None or _float("weight_decay", wd) == 0:
    solver = _alias.amsgrad(lr, b1, b2, eps, **options)
  else:
    mask: Any = None
    if built:
      decays = [bool(keras_optimizer._use_weight_decay(variables[j])) for j in plan.order]
      if not all(decays):
        mask = treedef.unflatten(decays)
    solver = _alias.amsgradw(
        lr, b1, b2, eps, weight_decay=_float("weight_decay", wd), mask=mask, **options
    )
  opt_state = _filled(solver, params, moments, count,
                      stochastic=state_rounding == "stochastic", seed=seed)
  return solver, opt_state


def to_keras(
    opt_state: optax.OptState,
    keras_optimizer: Any,
    *,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
) -> None:
  """Writes ``opt_state`` into a Keras 3 ``Adam/AdamW(amsgrad=True)``, in place.

  The optimizer must be built on the variables that correspond to the state's
  leaves (``keras_optimizer.build(model.trainable_variables)``); its
  ``momentums``, ``velocities``, ``velocity_hats`` and ``iterations`` are
  assigned, its hyperparameters are its own. ``opt_state`` is as in
  :func:`to_torch`.

  Example::

    keras_optimizer.build(model.trainable_variables)
    optax_amsgrad.to_keras(opt_state, keras_optimizer)

  Args:
    opt_state: the state of an ``optax_amsgrad`` solver.
    keras_optimizer: the built Keras ``Adam`` or ``AdamW`` to continue.
    order: as in :func:`from_keras`.
    layouts: as in :func:`from_keras`.

  Raises:
    TypeError: not a Keras ``Adam`` or ``AdamW``; no AMSGrad state in
      ``opt_state``.
    ValueError: ``amsgrad=False``, an unbuilt optimizer, a variable count or
      shape that does not match, mixed steps across the state's groups.
    NotImplementedError: gradient clipping, gradient accumulation, EMA,
      complex leaves.
  """
  _keras_adam(keras_optimizer)
  if not keras_optimizer.built:
    raise ValueError(
        "keras_optimizer is not built: build it on the model's variables first "
        "(keras_optimizer.build(model.trainable_variables))."
    )
  variables = list(keras_optimizer._trainable_variables)
  collected = _collected(opt_state)
  what = "Keras optimizer"
  plan = _plan(collected.plan_leaves, collected.treedef, len(variables), what, order, layouts)
  writes = []
  for i, j in enumerate(plan.order):
    _check_shape(plan, i, tuple(variables[j].shape), what)
    if plan.complex[i]:
      raise NotImplementedError(
          f"Leaf {i} ({plan.paths[i]}) is complex: Keras' AMSGrad is for real variables."
      )
    for buffers, value in zip(
        (keras_optimizer._momentums, keras_optimizer._velocities,
         keras_optimizer._velocity_hats),
        collected.moments[i], strict=True):
      variable = buffers[j]
      array = _to_framework_layout(_state_numpy(value), plan.axes[i])
      writes.append((variable, array.astype(jnp.dtype(str(variable.dtype)))))
  for variable, array in writes:
    variable.assign(array)
  keras_optimizer.iterations.assign(collected.step_count)


# --- Optax ----------------------------------------------------------------------


def _replaced(opt_state: optax.OptState, old: type[Any], new: Callable[..., Any]) -> Any:
  return jax.tree.map(
      lambda node: new(*node) if isinstance(node, old) else node, opt_state,
      is_leaf=lambda node: isinstance(node, old),
  )


def from_optax(opt_state: optax.OptState) -> optax.OptState:
  """The state of ``optax.amsgrad`` as the state of ``amsgrad(convention="optax")``.

  The values continue as they are: ``optax.amsgrad``'s state has the same
  fields (``count``, ``mu``, ``nu`` and the bias-corrected ``nu_max``), and
  ``convention="optax"`` reads them as Optax does. Only the state's class
  changes, in chains and partitions too.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> params = jnp.array([1.0, -2.0])
    >>> state = optax.amsgrad(0.1).init(params)
    >>> _, state = optax.amsgrad(0.1).update(2 * params, state)
    >>> solver = optax_amsgrad.amsgrad(0.1, convention="optax")
    >>> updates, state = solver.update(2 * params, optax_amsgrad.from_optax(state))
    >>> int(state[0].count)
    2

  Args:
    opt_state: a state of ``optax.amsgrad`` (or any state holding
      ``optax.ScaleByAmsgradState``).

  Returns:
    The same state with ``optax_amsgrad.ScaleByAmsgradState`` in place of
    ``optax.ScaleByAmsgradState``.
  """
  return _replaced(opt_state, optax.ScaleByAmsgradState, _transform.ScaleByAmsgradState)


def to_optax(opt_state: optax.OptState) -> optax.OptState:
  """The reverse of :func:`from_optax`: a state of ``amsgrad(convention="optax")``
  for ``optax.amsgrad``."""
  return _replaced(opt_state, _transform.ScaleByAmsgradState, optax.ScaleByAmsgradState)
