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
  ``amsgrad(convention="optax")`` (``"paper"`` for Optax's
  ``bias_correction_mu=False, bias_correction_nu=False``).

A state does not say what computed it, so each function that hands a state
over takes the ``solver`` it belongs to (``to_torch(state, torch_optimizer,
solver=solver)``) and refuses, naming every difference, a solver that
computes otherwise than the target: another convention, ``b1``, ``b2``,
``eps``, ``eps_root``, learning rate, weight decay or form of weight decay, or
moments the target would round. A solver says what it computes when
:func:`~optax_amsgrad.amsgrad`, :func:`~optax_amsgrad.amsgradw` or
:func:`~optax_amsgrad.scale_by_amsgrad` made it, or :func:`from_torch` and
:func:`from_keras`; PyTorch ``Adam``'s coupled weight decay and several param
groups are :func:`coupled_weight_decay` and :func:`partition`, the
``optax.chain`` and ``optax.partition`` that say what they hold.

Keras keeps an optimizer's state in private attributes; they are read as the
Keras versions ``KERAS_TESTED`` keep them (the range ``pyproject.toml`` allows,
its two ends tested), and a Keras without them is named in the error.

The state maps one to one: PyTorch's ``exp_avg``, ``exp_avg_sq`` and
``max_exp_avg_sq`` (Keras' ``momentums``, ``velocities`` and
``velocity_hats``) are ``mu``, ``nu`` and ``nu_max``, and the number of steps
taken (PyTorch's ``step``, Keras' ``iterations``) is ``count``. Both frameworks
keep the raw maximum ``max(v)``, as the ``"pytorch"`` and ``"keras"``
conventions do. torch and keras are imported only by the functions that need
them.

8-bit state (``mu_dtype="int8"``, ``nu_dtype="int8"``) is quantized on the
way in and decoded on the way out. :func:`from_torch` and :func:`from_keras`
encode the framework's float moments with the format's own encoder, as the
solver's steps store them: ``mu`` and ``nu`` under fresh block scales, rounded
as ``state_rounding`` says; ``nu_max`` to nearest from the larger of the
framework's maximum and the stored ``nu`` (never below the stored ``nu``,
never 0 where the framework's is positive). The hand-over error is the code's
resolution: :func:`~optax_amsgrad.decode_state` of the result differs from the
framework's ``x`` by less than one step of the code, ``2**-M |x|`` with ``M``
its mantissa bits (3 for ``mu``, E4M3, and for ``nu`` and ``nu_max``, E5M3: a
relative step of 1/8), down to the smallest binade the block's scale reaches,
and by less than that binade's step below it (``tests/test_int8_interop.py``
derives the bound from the format and checks it). Leaves the solver keeps in
float32 (too small for blocks) move exactly. :func:`to_torch` and
:func:`to_keras` write the values ``decode_state`` reads, the ones the next
step would use, into the framework's float32 buffers, exactly.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_amsgrad import _alias, _transform
from optax_amsgrad._interop_solver import (
    Facts,
    coupled_weight_decay,
    differences,
    leaf_facts,
    partition,
    refuse,
    storage_differences,
)
from optax_amsgrad._interop_state import (
    Layouts,
    _check_complex,
    _check_shape,
    _check_state_complex,
    _Collected,
    _collected,
    _filled,
    _float,
    _Moments,
    _numpy,
    _Plan,
    _plan,
    _state_numpy,
    _to_framework_layout,
    _to_params_layout,
)

__all__ = [
    "KERAS_TESTED",
    "coupled_weight_decay",
    "from_keras",
    "from_optax",
    "from_torch",
    "partition",
    "to_keras",
    "to_optax",
    "to_torch",
]

# The Keras versions whose private optimizer attributes interop reads, as
# tested (pyproject.toml bounds keras to the same range).
KERAS_TESTED = ">=3.5,<3.16"
_TORCH_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# --- Checking the solver against the target -----------------------------------


def _check_solver(
    solver: Any,
    collected: _Collected,
    plan: _Plan,
    target_facts: Sequence[Facts],
    target_dtypes: Sequence[Any],
    target: str,
    *,
    learning_rate_dtype: Any = np.float64,
) -> None:
  """ValueError naming every way ``solver`` (whose state ``collected`` is)
  computes other than the target, whose parameter ``plan.order[i]`` has
  ``target_facts[i]`` and holds its moments in ``target_dtypes[i]``."""
  params_like = collected.treedef.unflatten([leaf for _, leaf in collected.plan_leaves])
  ours = leaf_facts(solver, params_like)
  names = [f"leaf {i} {plan.paths[i]}" for i in range(len(ours))]
  refuse(
      differences(ours, target_facts, names, learning_rate_dtype=learning_rate_dtype)
      + storage_differences(ours, [(m.mu, m.nu) for m in collected.stored], target_dtypes,
                            names, target),
      target,
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


def _torch_entries(state_dict: Mapping[str, Any], ids: Sequence[Any]) -> list[Any] | None:
  """Each parameter's state (in the order of ``ids``), or None before the
  first step; refuses states that are not AMSGrad's and mixed steps."""
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
  return entries if steps else None


def _torch_step(entries: Sequence[Any]) -> int:
  """The one step count of ``entries`` (checked by :func:`_torch_entries`)."""
  step = float(_numpy(entries[0]["step"]))
  if step < 0 or step != int(step):
    raise ValueError(f"The step {step} is not a whole number of steps.")
  return int(step)


def _torch_moments(entries: Sequence[Any], plan: _Plan, what: str) -> list[_Moments]:
  """Each leaf's moments, from its parameter's entry, in the params' layout."""
  moments = []
  for i, j in enumerate(plan.order):
    values = [_numpy(entries[j][k]) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    for value in values:
      _check_shape(plan, i, value.shape, what)
    _check_complex(plan, i, np.iscomplexobj(values[0]), what)
    moments.append(_Moments(*(_to_params_layout(v, plan.axes[i]) for v in values)))
  return moments


def _torch_decoupled(group: Mapping[str, Any], g: int, default: bool | None) -> bool:
  """Whether the group's weight decay is AdamW's (decoupled) or Adam's."""
  decoupled = group.get("decoupled_weight_decay", default)
  if decoupled is None:
    wd = _float("weight_decay", group["weight_decay"])
    if wd != 0:
      raise ValueError(
          f"Param group {g} has weight_decay={wd} but the state dict does not "
          "say whether it is Adam's (coupled) or AdamW's (decoupled): pass "
          "decoupled_weight_decay=True for AdamW, False for Adam."
      )
    return False
  return bool(decoupled)


def _torch_group_solver(
    group: Mapping[str, Any],
    g: int,
    learning_rate: optax.ScalarOrSchedule | None,
    decoupled: bool,
    options: dict[str, Any],
) -> optax.GradientTransformation:
  """The solver of one param group: amsgradw (AdamW), the coupled chain
  (Adam with weight decay), or amsgrad."""
  lr = learning_rate
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
  if decoupled:
    return _alias.amsgradw(lr, b1, b2, eps, weight_decay=wd, **options)
  if wd != 0:
    return coupled_weight_decay(wd, _alias.amsgrad(lr, b1, b2, eps, **options))
  return _alias.amsgrad(lr, b1, b2, eps, **options)


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
  ``weight_decay`` the coupled :func:`coupled_weight_decay` (``optax.chain(
  optax.add_decayed_weights(wd), amsgrad(...))``), ``Adam`` without it
  :func:`amsgrad`; several param groups become a :func:`partition` over the
  leaves, labelled by group index. The state is ``solver.init(params)``
  holding the optimizer's moments and step, placed as ``init`` places it (on
  each param's sharding), so a jitted step compiles once for both.

  Example (``torch_optimizer`` a ``torch.optim.Adam(amsgrad=True)`` over a
  ``torch.nn.Linear``, ``params = {"kernel": ..., "bias": ...}`` the same
  weights in Flax's layout, whose leaves come in the order bias, kernel)::

    solver, state = optax_amsgrad.from_torch(
        torch_optimizer.state_dict(), params,
        order=[1, 0],                            # bias is torch's parameter 1
        layouts={"bias": None, "kernel": (1, 0)},  # (out, in) -> (in, out)
    )

  Examples:
    >>> import torch
    >>> import optax_amsgrad
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> torch_optimizer = torch.optim.Adam([w], lr=0.1, amsgrad=True)
    >>> w.grad = torch.tensor([2.0, -1.0])
    >>> torch_optimizer.step()
    >>> solver, state = optax_amsgrad.from_torch(
    ...     torch_optimizer.state_dict(), {"w": w.detach().numpy()})
    >>> int(state[0].count), state[0].nu_max["w"]
    (1, Array([0.004, 0.001], dtype=float32))

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
    mu_dtype: storage dtype of ``mu``, as in :func:`amsgrad`; ``"int8"``
      for 8-bit blocks, into which the moments are quantized (the hand-over
      error is bounded in the module's notes).
    nu_dtype: storage dtype of ``nu`` and ``nu_max`` (``"int8"``: 8-bit
      blocks, ``nu_max`` rounded up). Values narrower than the optimizer's
      are rounded as the solver's steps store them.
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

  entries = _torch_entries(state_dict, ids)
  count = 0 if entries is None else _torch_step(entries)
  moments = None if entries is None else _torch_moments(entries, plan, what)

  options: dict[str, Any] = {"convention": "pytorch", "mu_dtype": mu_dtype, "nu_dtype": nu_dtype,
                             "state_rounding": state_rounding, "seed": seed}
  transforms = [
      _torch_group_solver(group, g, _lr_or_override(learning_rate, g, len(groups)),
                          _torch_decoupled(group, g, decoupled_weight_decay), options)
      for g, group in enumerate(groups)
  ]
  solver: optax.GradientTransformation = transforms[0]
  if len(transforms) > 1:
    labels = treedef.unflatten([group_of[j] for j in plan.order])
    solver = partition(dict(enumerate(transforms)), labels)
  opt_state = _filled(solver, params, moments, count,
                      stochastic=state_rounding == "stochastic", seed=seed)
  return solver, opt_state


def _torch_adam(torch_optimizer: Any) -> Any:
  import torch

  if not isinstance(torch_optimizer, torch.optim.Adam):
    raise TypeError(
        "torch_optimizer must be a torch.optim.Adam or AdamW (with amsgrad=True); "
        f"got {type(torch_optimizer).__qualname__}."
    )
  return torch


def _torch_facts(torch: Any, torch_optimizer: Any) -> list[Facts]:
  """What the optimizer computes, per parameter (counting through its param
  groups); the learning rate is None where an LR scheduler drives it."""
  adamw = isinstance(torch_optimizer, torch.optim.AdamW)
  facts = []
  for group in torch_optimizer.param_groups:
    b1, b2 = (_float(f"betas[{k}]", b) for k, b in enumerate(group["betas"]))
    lr = None if "initial_lr" in group else _float("lr", group["lr"])
    one = Facts(
        convention="pytorch", b1=b1, b2=b2, eps=_float("eps", group["eps"]), eps_root=0.0,
        learning_rate=lr, weight_decay=_float("weight_decay", group["weight_decay"]),
        decoupled=bool(group.get("decoupled_weight_decay", adamw)),
        mu_dtype=None, nu_dtype=None,
    )
    facts.extend([one] * len(group["params"]))
  return facts


def _torch_dtype(tensor: Any) -> np.dtype:
  return jnp.dtype(str(tensor.dtype).removeprefix("torch."))


def to_torch(
    opt_state: optax.OptState,
    torch_optimizer: Any,
    *,
    solver: optax.GradientTransformation,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
) -> dict[str, Any]:
  """A state dict for ``torch_optimizer.load_state_dict`` that continues ``opt_state``.

  ``torch_optimizer`` is a ``torch.optim.Adam`` or ``AdamW`` with
  ``amsgrad=True`` built on the parameters that correspond to the leaves of
  the state (typically the JAX params copied into a torch model), with the
  hyperparameters of ``solver``: the state does not say what computed it, so
  ``solver`` says, and it must compute what the torch optimizer will, leaf
  by leaf: convention ``"pytorch"`` (the ``"keras"``, ``"optax"`` and
  ``"paper"`` states continue under another formula), the same ``b1``,
  ``b2``, ``eps``, no ``eps_root``, the same constant learning rate (where
  both have one), the same weight decay in the same form (``AdamW``'s
  decoupled is :func:`amsgradw`, ``Adam``'s coupled
  :func:`coupled_weight_decay`), the storage of the state (an ``"int8"``
  solver with a state in 8-bit blocks, a float one with float moments), and
  moments the torch optimizer holds as they are (narrow moments are widened
  exactly to the parameters' dtype; 8-bit blocks are written as
  :func:`~optax_amsgrad.decode_state` reads them, in float32; a wider state
  would be rounded). Every difference is named in one
  ``ValueError``; the torch optimizer's hyperparameters are its own and are
  not overwritten.

  Example::

    torch_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    torch_optimizer.load_state_dict(
        optax_amsgrad.to_torch(opt_state, torch_optimizer, solver=solver))

  Examples:
    >>> import jax.numpy as jnp
    >>> import torch
    >>> import optax_amsgrad
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> solver = optax_amsgrad.amsgrad(0.1)
    >>> state = solver.init(params)
    >>> _, state = solver.update({"w": jnp.array([2.0, -1.0])}, state, params)
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> torch_optimizer = torch.optim.Adam([w], lr=0.1, amsgrad=True)
    >>> torch_optimizer.load_state_dict(
    ...     optax_amsgrad.to_torch(state, torch_optimizer, solver=solver))
    >>> torch_optimizer.state[w]["max_exp_avg_sq"]
    tensor([0.0040, 0.0010])

  Args:
    opt_state: the state of an ``optax_amsgrad`` solver: :func:`amsgrad`,
      :func:`amsgradw`, or chains and ``optax.partition`` of them.
    torch_optimizer: the ``torch.optim.Adam/AdamW(amsgrad=True)`` to continue.
    solver: the solver ``opt_state`` is the state of, as :func:`amsgrad`,
      :func:`amsgradw` or :func:`scale_by_amsgrad` made it, or as
      :func:`from_torch` returned it; :func:`coupled_weight_decay` and
      :func:`partition` for Adam's weight decay and several param groups (a
      plain ``optax.chain`` or ``optax.partition`` hides what it computes).
    order: as in :func:`from_torch`.
    layouts: as in :func:`from_torch`, a tree shaped like the params.

  Returns:
    The state dict, with the optimizer's own param groups.

  Raises:
    TypeError: not a torch Adam or AdamW; no AMSGrad state in ``opt_state``;
      a ``solver`` that does not say what it computes.
    ValueError: ``amsgrad=False``, a parameter count or shape that does not
      match, mixed steps across the state's groups, a ``solver`` that
      computes otherwise than the torch optimizer.
    NotImplementedError: ``maximize=True``; complex parameters whose second
      moment is kept as ``|g|**2``, or complex against real.
  """
  torch = _torch_adam(torch_optimizer)
  template = torch_optimizer.state_dict()
  _torch_groups(template)
  tensors = [p for group in torch_optimizer.param_groups for p in group["params"]]
  ids = [pid for group in template["param_groups"] for pid in group["params"]]
  collected = _collected(opt_state)
  what = "torch optimizer"
  plan = _plan(collected.plan_leaves, collected.treedef, len(ids), what, order, layouts)
  for i, j in enumerate(plan.order):
    _check_shape(plan, i, tuple(tensors[j].shape), what)
    _check_complex(plan, i, bool(tensors[j].is_complex()), what)
    _check_state_complex(collected, plan, i, what)
  facts = _torch_facts(torch, torch_optimizer)
  _check_solver(solver, collected, plan, [facts[j] for j in plan.order],
                [_torch_dtype(tensors[j]) for j in plan.order], what)
  return {"state": _torch_state(torch, collected, plan, tensors, ids),
          "param_groups": template["param_groups"]}


def _torch_state(
    torch: Any, collected: _Collected, plan: _Plan, tensors: Sequence[Any], ids: Sequence[Any]
) -> dict[Any, Any]:
  """The ``state`` of the state dict: per parameter, the moments as tensors
  like the parameter's, and the step; empty before the first step (PyTorch
  has no state then)."""
  if collected.step_count == 0:
    return {}
  step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
  state: dict[Any, Any] = {}
  for i, j in enumerate(plan.order):
    tensor = tensors[j]

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
  return state


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


def _keras_private(keras_optimizer: Any, name: str) -> Any:
  """A private attribute of the Keras optimizer, or an error naming the
  installed Keras where it is not there (Keras does not promise them)."""
  try:
    return getattr(keras_optimizer, name)
  except AttributeError:
    import keras

    raise RuntimeError(
        f"keras_optimizer ({type(keras_optimizer).__qualname__}) has no {name}: "
        "optax_amsgrad reads the optimizer's state through private attributes of "
        f"Keras, tested for keras{KERAS_TESTED}, and Keras {keras.__version__} is "
        f"installed. Install a Keras in that range (pip install 'keras{KERAS_TESTED}')."
    ) from None


def _keras_buffers(keras_optimizer: Any) -> tuple[Any, Any, Any]:
  """The optimizer's momentums, velocities and velocity_hats, one variable
  per trainable variable."""
  names = ("_momentums", "_velocities", "_velocity_hats")
  mu, nu, nu_max = (_keras_private(keras_optimizer, name) for name in names)
  return mu, nu, nu_max


def _keras_variables(keras_optimizer: Any) -> list[Any] | None:
  """The variables the optimizer was built on; None if it is not built."""
  if not keras_optimizer.built:
    return None
  return list(_keras_private(keras_optimizer, "_trainable_variables"))


def _keras_moments(
    keras_optimizer: Any, variables: Sequence[Any], plan: _Plan, what: str
) -> list[_Moments]:
  """Each leaf's moments, from its variable's buffers, in the params' layout."""
  buffers = _keras_buffers(keras_optimizer)
  moments = []
  for i, j in enumerate(plan.order):
    _check_shape(plan, i, tuple(variables[j].shape), what)
    _check_complex(plan, i, "complex" in str(variables[j].dtype), what)
    if plan.complex[i]:
      raise NotImplementedError(
          f"params leaf {i} ({plan.paths[i]}) is complex: Keras' AMSGrad is for "
          "real variables."
      )
    values = [_numpy(buffer[j].value) for buffer in buffers]
    moments.append(_Moments(*(_to_params_layout(v, plan.axes[i]) for v in values)))
  return moments


def _keras_learning_rate(keras: Any, keras_optimizer: Any) -> float | None:
  """The optimizer's learning rate (its float32 value); None for a schedule."""
  rate = _keras_private(keras_optimizer, "_learning_rate")
  # A variable otherwise (whose class keras.Variable is not before Keras 3.6).
  if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) or callable(rate):
    return None
  return float(_numpy(getattr(rate, "value", rate)))


def _keras_weight_decay(keras_optimizer: Any) -> float:
  wd = keras_optimizer.weight_decay
  return 0.0 if wd is None else _float("weight_decay", wd)


def _keras_decays(keras_optimizer: Any, variables: Sequence[Any] | None) -> list[bool] | None:
  """Whether each variable decays (``exclude_from_weight_decay``); None when
  the optimizer is not built and excludes nothing (every variable decays).

  Keras matches the exclusions to the variables (by identity, by a pattern of
  their names) when it builds; before that, the variables' names are
  unknown here, so an unbuilt optimizer that excludes any is refused."""
  if variables is not None:
    use = _keras_private(keras_optimizer, "_use_weight_decay")
    return [bool(use(variable)) for variable in variables]
  excluded = getattr(keras_optimizer, "_exclude_from_weight_decay", None)
  pattern = getattr(keras_optimizer, "_exclude_from_weight_decay_pattern", None)
  configured = hasattr(keras_optimizer, "_exclude_from_weight_decay_cache")
  if excluded or pattern is not None or (configured and excluded is None):
    names = f" (var_names matching {pattern.pattern!r})" if pattern is not None else ""
    raise ValueError(
        f"keras_optimizer is not built and excludes variables from its weight decay{names}; "
        "which variables those are is known once it is built on them: build it first "
        "(keras_optimizer.build(model.trainable_variables)) and pass it again."
    )
  return None


def _keras_facts(keras: Any, keras_optimizer: Any, variables: Sequence[Any]) -> list[Facts]:
  """What the optimizer computes, per variable: Keras decays ``Adam`` and
  ``AdamW`` alike, decoupled, where ``exclude_from_weight_decay`` lets it."""
  wd = _keras_weight_decay(keras_optimizer)
  decays = _keras_decays(keras_optimizer, variables) if wd else None
  one = Facts(
      convention="keras",
      b1=_float("beta_1", keras_optimizer.beta_1),
      b2=_float("beta_2", keras_optimizer.beta_2),
      eps=_float("epsilon", keras_optimizer.epsilon),
      eps_root=0.0,
      learning_rate=_keras_learning_rate(keras, keras_optimizer),
      weight_decay=wd,
      decoupled=True,
      mu_dtype=None,
      nu_dtype=None,
  )
  if decays is None:
    return [one] * len(variables)
  return [one if decay else one._replace(weight_decay=0.0) for decay in decays]


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

  Keras keeps these in private attributes, read here as Keras 3.5 to 3.15
  (``optax_amsgrad.interop.KERAS_TESTED``) keep them; another Keras that
  lacks one gets a ``RuntimeError`` naming its version.

  Example::

    solver, state = optax_amsgrad.from_keras(model.optimizer, params)

  Examples:
    >>> import os
    >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")
    >>> import keras
    >>> import numpy as np
    >>> import optax_amsgrad
    >>> w = keras.Variable(np.array([1.0, 2.0], np.float32))
    >>> keras_optimizer = keras.optimizers.Adam(learning_rate=0.1, amsgrad=True)
    >>> _ = keras_optimizer.apply_gradients([(np.array([2.0, -1.0], np.float32), w)])
    >>> solver, state = optax_amsgrad.from_keras(keras_optimizer, {"w": np.asarray(w)})
    >>> int(state[0].count), state[0].nu_max["w"]
    (1, Array([0.004, 0.001], dtype=float32))

  Args:
    keras_optimizer: a Keras 3 ``Adam`` or ``AdamW`` with ``amsgrad=True``,
      built (an unbuilt one has taken no step: the state is zero; it must be
      built if it excludes variables from its weight decay, since Keras
      matches them to the variables when it builds).
    params: the parameters, whose ``jax.tree.leaves`` are the variables the
      optimizer was built on (in the order of ``order``).
    order: ``order[i]`` is the optimizer's variable for leaf ``i``.
    layouts: as in :func:`from_torch`.
    learning_rate: overrides the optimizer's learning rate: a float or an Optax
      schedule of the number of steps taken. Required when the optimizer's
      learning rate is a schedule.
    mu_dtype: storage dtype of ``mu``; ``"int8"`` quantizes it into 8-bit
      blocks, as in :func:`from_torch`.
    nu_dtype: storage dtype of ``nu`` and ``nu_max``; ``"int8"`` as in
      :func:`from_torch` (``nu_max`` rounded up).
    state_rounding: ``"stochastic"`` or ``"nearest"``.
    seed: seed of the stochastic rounding.

  Returns:
    ``(solver, opt_state)``.

  Raises:
    TypeError: not a Keras ``Adam`` or ``AdamW``.
    ValueError: ``amsgrad=False``, a variable count or shape that does not match
      ``params``, a bad ``order`` or ``layouts``, a learning-rate schedule
      without ``learning_rate``, an unbuilt optimizer with weight-decay
      exclusions.
    NotImplementedError: gradient clipping, gradient accumulation, EMA,
      callable hyperparameters, complex variables.
    RuntimeError: a Keras without the private attributes read here.
  """
  keras = _keras_adam(keras_optimizer)
  leaves_with_paths, treedef_ = jax.tree_util.tree_flatten_with_path(params)
  treedef: Any = treedef_  # PyTreeDef's stubs lack unflatten
  variables = _keras_variables(keras_optimizer)
  what = "Keras optimizer"
  plan = _plan(leaves_with_paths, treedef,
               len(leaves_with_paths) if variables is None else len(variables),
               what, order, layouts)
  count, moments = 0, None
  if variables is not None:
    count = int(_numpy(keras_optimizer.iterations))
    moments = _keras_moments(keras_optimizer, variables, plan, what)
  solver = _keras_solver(keras, keras_optimizer, variables, plan, treedef, learning_rate, {
      "convention": "keras", "mu_dtype": mu_dtype, "nu_dtype": nu_dtype,
      "state_rounding": state_rounding, "seed": seed})
  opt_state = _filled(solver, params, moments, count,
                      stochastic=state_rounding == "stochastic", seed=seed)
  return solver, opt_state


def _keras_solver(
    keras: Any,
    keras_optimizer: Any,
    variables: Sequence[Any] | None,
    plan: _Plan,
    treedef: Any,
    learning_rate: optax.ScalarOrSchedule | None,
    options: dict[str, Any],
) -> optax.GradientTransformation:
  """amsgrad, or amsgradw masked where Keras excludes variables from the
  decay, with the optimizer's hyperparameters."""
  lr = learning_rate
  if lr is None:
    lr = _keras_learning_rate(keras, keras_optimizer)
    if lr is None:
      raise ValueError(
          f"keras_optimizer's learning rate is {keras_optimizer._learning_rate!r}, a "
          "schedule, which does not travel: pass learning_rate= (an Optax schedule of "
          "the step count, or a float)."
      )
  b1 = _float("beta_1", keras_optimizer.beta_1)
  b2 = _float("beta_2", keras_optimizer.beta_2)
  eps = _float("epsilon", keras_optimizer.epsilon)
  wd = _keras_weight_decay(keras_optimizer)
  if wd == 0:
    return _alias.amsgrad(lr, b1, b2, eps, **options)
  decays = _keras_decays(keras_optimizer, variables)
  mask: Any = None
  if decays is not None and not all(decays):
    mask = treedef.unflatten([decays[j] for j in plan.order])
  return _alias.amsgradw(lr, b1, b2, eps, weight_decay=wd, mask=mask, **options)


def to_keras(
    opt_state: optax.OptState,
    keras_optimizer: Any,
    *,
    solver: optax.GradientTransformation,
    order: Sequence[int] | None = None,
    layouts: Layouts = None,
) -> None:
  """Writes ``opt_state`` into a Keras 3 ``Adam/AdamW(amsgrad=True)``, in place.

  The optimizer must be built on the variables that correspond to the state's
  leaves (``keras_optimizer.build(model.trainable_variables)``); its
  ``momentums``, ``velocities``, ``velocity_hats`` and ``iterations`` are
  assigned, its hyperparameters are its own. ``solver`` must compute what the
  optimizer will, as in :func:`to_torch`: convention ``"keras"``, the same
  ``b1``, ``b2``, ``eps`` (``epsilon``), no ``eps_root``, the same constant
  learning rate (in float32, as Keras holds it), the same decoupled weight
  decay where Keras applies it (:func:`amsgradw` with a mask for
  ``exclude_from_weight_decay``), the state's storage, and moments the
  variables hold as they are (8-bit blocks are written as
  :func:`~optax_amsgrad.decode_state` reads them). Every difference is named in one ``ValueError``.

  Example::

    keras_optimizer.build(model.trainable_variables)
    optax_amsgrad.to_keras(opt_state, keras_optimizer, solver=solver)

  Examples:
    >>> import os
    >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")
    >>> import jax.numpy as jnp
    >>> import keras
    >>> import numpy as np
    >>> import optax_amsgrad
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> solver = optax_amsgrad.amsgrad(0.1, eps=1e-7, convention="keras")
    >>> state = solver.init(params)
    >>> _, state = solver.update({"w": jnp.array([2.0, -1.0])}, state, params)
    >>> w = keras.Variable(np.array([1.0, 2.0], np.float32))
    >>> keras_optimizer = keras.optimizers.Adam(learning_rate=0.1, amsgrad=True)
    >>> keras_optimizer.build([w])
    >>> optax_amsgrad.to_keras(state, keras_optimizer, solver=solver)
    >>> int(keras_optimizer.iterations)
    1

  Args:
    opt_state: the state of an ``optax_amsgrad`` solver.
    keras_optimizer: the built Keras ``Adam`` or ``AdamW`` to continue.
    solver: the solver ``opt_state`` is the state of, as in :func:`to_torch`.
    order: as in :func:`from_keras`.
    layouts: as in :func:`from_keras`.

  Raises:
    TypeError: not a Keras ``Adam`` or ``AdamW``; no AMSGrad state in
      ``opt_state``; a ``solver`` that does not say what it computes.
    ValueError: ``amsgrad=False``, an unbuilt optimizer, a variable count or
      shape that does not match, mixed steps across the state's groups, a
      ``solver`` that computes otherwise than the optimizer.
    NotImplementedError: gradient clipping, gradient accumulation, EMA,
      complex leaves.
    RuntimeError: a Keras without the private attributes written here.
  """
  keras = _keras_adam(keras_optimizer)
  variables = _keras_variables(keras_optimizer)
  if variables is None:
    raise ValueError(
        "keras_optimizer is not built: build it on the model's variables first "
        "(keras_optimizer.build(model.trainable_variables))."
    )
  collected = _collected(opt_state)
  what = "Keras optimizer"
  plan = _plan(collected.plan_leaves, collected.treedef, len(variables), what, order, layouts)
  for i, j in enumerate(plan.order):
    _check_shape(plan, i, tuple(variables[j].shape), what)
    if plan.complex[i]:
      raise NotImplementedError(
          f"Leaf {i} ({plan.paths[i]}) is complex: Keras' AMSGrad is for real variables."
      )
  buffers = _keras_buffers(keras_optimizer)
  facts = _keras_facts(keras, keras_optimizer, variables)
  _check_solver(solver, collected, plan, [facts[j] for j in plan.order],
                [jnp.dtype(str(buffers[0][j].dtype)) for j in plan.order], what,
                learning_rate_dtype=np.float32)
  writes = []
  for i, j in enumerate(plan.order):
    for buffer, value in zip(buffers, collected.moments[i], strict=True):
      array = _to_framework_layout(_state_numpy(value), plan.axes[i])
      writes.append((buffer[j], array.astype(jnp.dtype(str(buffer[j].dtype)))))
  for variable, array in writes:
    variable.assign(array)
  keras_optimizer.iterations.assign(collected.step_count)


# --- Optax ----------------------------------------------------------------------


def _replaced(opt_state: optax.OptState, old: type[Any], new: Callable[..., Any]) -> Any:
  return jax.tree.map(
      lambda node: new(*node) if isinstance(node, old) else node, opt_state,
      is_leaf=lambda node: isinstance(node, old),
  )


# optax.scale_by_amsgrad's options, read from its update function's closure
# (Optax keeps them nowhere else); the two flags are Optax 0.2.8's.
_OPTAX_OPTIONS = ("b1", "b2", "eps", "eps_root", "mu_dtype",
                  "bias_correction_mu", "bias_correction_nu")


def _optax_options(optimizer: Any) -> list[dict[str, Any]]:
  """The options of each ``optax.scale_by_amsgrad`` inside ``optimizer``,
  found through the closures of its update function (and of those it
  calls)."""
  found: list[dict[str, Any]] = []
  seen: set[int] = set()

  def visit(value: Any, depth: int) -> None:
    if id(value) in seen or depth > 12:
      return
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
      for item in value:
        visit(item, depth + 1)
      return
    code = getattr(value, "__code__", None)
    if code is None:
      return
    cells = dict(zip(code.co_freevars, value.__closure__ or (), strict=True))
    if value.__qualname__.startswith("scale_by_amsgrad.") and set(_OPTAX_OPTIONS) <= set(cells):
      found.append({name: cells[name].cell_contents for name in _OPTAX_OPTIONS})
      return
    for cell in cells.values():
      try:
        visit(cell.cell_contents, depth + 1)
      except ValueError:  # an empty cell
        continue

  visit(getattr(optimizer, "update", optimizer), 0)
  return found


def _optax_bias_correction(
    optimizer: Any, bias_correction_mu: bool | None, bias_correction_nu: bool | None
) -> tuple[tuple[bool, bool], dict[str, Any] | None]:
  """The two bias-correction flags, from ``optimizer`` where given (with its
  options) and from the arguments; refuses what disagrees or is missing."""
  options: dict[str, Any] | None = None
  flags = (bias_correction_mu, bias_correction_nu)
  if optimizer is not None:
    found = _optax_options(optimizer)
    if len(found) != 1:
      raise ValueError(
          f"optimizer: found {len(found)} optax.scale_by_amsgrad in it, where one was "
          "expected (an optax.amsgrad, or a chain holding one); pass "
          "bias_correction_mu= and bias_correction_nu= instead."
      )
    options = found[0]
    read = (bool(options["bias_correction_mu"]), bool(options["bias_correction_nu"]))
    for name, given, have in zip(("bias_correction_mu", "bias_correction_nu"), flags, read,
                                 strict=True):
      if given is not None and bool(given) != have:
        raise ValueError(f"{name}={given} but the optimizer has {name}={have}.")
    flags = read
  if flags[0] is None or flags[1] is None:
    raise TypeError(
        "from_optax needs to know how optax.amsgrad corrected its bias: pass "
        "optimizer= (the optax.amsgrad the state comes from) or both "
        "bias_correction_mu= and bias_correction_nu= (Optax's defaults are True)."
    )
  return (bool(flags[0]), bool(flags[1])), options


def _optax_differences(
    opt_state: optax.OptState, solver: Any, convention: str, options: dict[str, Any] | None
) -> list[str]:
  """Each way ``solver`` would continue the state otherwise than Optax: its
  convention against the one the bias correction makes, and, where the
  optimizer's options are known, ``b1``, ``b2``, ``eps`` and ``eps_root``;
  its storage against the state's."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAmsgradState))
  states = [node for node in nodes if isinstance(node, optax.ScaleByAmsgradState)]
  if not states:
    raise TypeError("opt_state holds no optax.ScaleByAmsgradState: not a state of optax.amsgrad.")
  with_paths = jax.tree_util.tree_flatten_with_path(states[0].mu)[0]
  names = [f"leaf {i} {jax.tree_util.keystr(path)}" for i, (path, _) in enumerate(with_paths)]
  ours = leaf_facts(solver, states[0].mu)
  known = {} if options is None else {k: options[k] for k in ("b1", "b2", "eps", "eps_root")}
  theirs = [f._replace(convention=convention, **known) for f in ours]
  leaves = list(zip(jax.tree.leaves(states[0].mu), jax.tree.leaves(states[0].nu), strict=True))
  return differences(ours, theirs, names) + storage_differences(
      ours, leaves, [jnp.result_type(nu) for _, nu in leaves], names, "Optax optimizer")


def from_optax(
    opt_state: optax.OptState,
    optimizer: optax.GradientTransformation | None = None,
    *,
    solver: optax.GradientTransformation,
    bias_correction_mu: bool | None = None,
    bias_correction_nu: bool | None = None,
) -> optax.OptState:
  """The state of ``optax.amsgrad`` as the state of ``solver``, which continues it.

  The values continue as they are: ``optax.amsgrad``'s state has the same
  fields (``count``, ``mu``, ``nu`` and ``nu_max``), and only the state's
  class changes, in chains and partitions too. What ``nu_max`` holds depends
  on Optax's bias correction: with ``bias_correction_mu`` and
  ``bias_correction_nu`` (Optax's defaults) it is the bias-corrected maximum
  of ``convention="optax"``; with neither, the raw maximum and uncorrected
  ``m`` of ``convention="paper"``. One without the other has no convention
  here and is refused. The flags are read from ``optimizer`` where it is
  given, else taken from the arguments; ``solver`` must have the matching
  convention and, where ``optimizer`` is given, its ``b1``, ``b2``, ``eps``,
  ``eps_root`` and ``mu_dtype``: every difference is named in one
  ``ValueError``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> params = jnp.array([1.0, -2.0])
    >>> theirs = optax.amsgrad(0.1)
    >>> _, state = theirs.update(2 * params, theirs.init(params))
    >>> solver = optax_amsgrad.amsgrad(0.1, convention="optax")
    >>> state = optax_amsgrad.from_optax(state, theirs, solver=solver)
    >>> updates, state = solver.update(2 * params, state)
    >>> int(state[0].count)
    2

  Args:
    opt_state: a state of ``optax.amsgrad`` (or any state holding
      ``optax.ScaleByAmsgradState``).
    optimizer: the ``optax.amsgrad`` (or ``optax.scale_by_amsgrad``, or a
      chain holding one) the state comes from; its options are read from it.
    solver: the ``optax_amsgrad`` solver that continues the state.
    bias_correction_mu: Optax's flag, where ``optimizer`` is not given.
    bias_correction_nu: Optax's flag, where ``optimizer`` is not given.

  Returns:
    The same state with ``optax_amsgrad.ScaleByAmsgradState`` in place of
    ``optax.ScaleByAmsgradState``.

  Raises:
    TypeError: neither ``optimizer`` nor both flags; a ``solver`` that does
      not say what it computes.
    ValueError: flags that disagree with ``optimizer``, one bias correction
      without the other, a ``solver`` that computes otherwise.
  """
  (mu_flag, nu_flag), options = _optax_bias_correction(
      optimizer, bias_correction_mu, bias_correction_nu)
  if mu_flag != nu_flag:
    raise ValueError(
        f"bias_correction_mu={mu_flag} with bias_correction_nu={nu_flag} is no "
        "convention of optax_amsgrad: both (convention='optax') or neither "
        "(convention='paper') continue exactly."
    )
  convention = "optax" if mu_flag else "paper"
  refuse(_optax_differences(opt_state, solver, convention, options),
         f"Optax optimizer (bias_correction_mu={mu_flag}, bias_correction_nu={nu_flag})")
  return _replaced(opt_state, optax.ScaleByAmsgradState, _transform.ScaleByAmsgradState)


def to_optax(opt_state: optax.OptState) -> optax.OptState:
  """The reverse of :func:`from_optax`: a state of ``amsgrad(convention="optax")``
  for ``optax.amsgrad`` (or of ``convention="paper"`` for ``optax.amsgrad``
  with ``bias_correction_mu=False`` and ``bias_correction_nu=False``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> params = {"w": jnp.zeros(2)}
    >>> state = optax_amsgrad.amsgrad(1e-3, convention="optax").init(params)
    >>> optax_state = optax_amsgrad.to_optax(state)
    >>> isinstance(optax_state[0], optax.ScaleByAmsgradState)
    True
    >>> updates, optax_state = optax.amsgrad(1e-3).update({"w": jnp.ones(2)}, optax_state)
    >>> int(optax_state[0].count)
    1
  """
  return _replaced(opt_state, _transform.ScaleByAmsgradState, optax.ScaleByAmsgradState)
