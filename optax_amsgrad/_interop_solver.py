"""What a solver computes, read from the solver, so that interop can check it
against what another framework's optimizer computes.

A solver made here says what it is: the update of ``scale_by_amsgrad`` carries
its :class:`~optax_amsgrad._transform.Options`, that of ``amsgrad``,
``amsgradw`` (and ``flatten_by_dtype`` of them) its recipe, and
:func:`coupled_weight_decay` and :func:`partition` (which ``from_torch``
builds with) describe themselves. Any other solver (a plain ``optax.chain``
around ours, say) hides its hyperparameters, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_amsgrad import _blockwise, _step, _transform, _validation


class Facts(NamedTuple):
  """What a solver does to one leaf: the AMSGrad formula and hyperparameters,
  its learning rate (None where the solver does not fix one: a schedule, or
  a bare ``scale_by_amsgrad``), its weight decay and how it is applied, and
  the storage dtypes it asks for (None: the params' own)."""

  convention: str
  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  learning_rate: float | None
  weight_decay: float
  decoupled: bool
  mu_dtype: Any
  nu_dtype: Any


class DescribedUpdate(_step.ForwardingUpdate):
  """The update function of a solver built here out of Optax combinators,
  carrying ``facts(params)``: one :class:`Facts` per leaf of ``params``."""

  def __init__(
      self,
      update: Callable[..., Any],
      facts: Callable[[optax.Params], list[Facts]],
  ) -> None:
    super().__init__(update)
    self.facts = facts


_WHAT_TO_PASS = (
    "pass the solver as amsgrad, amsgradw or scale_by_amsgrad made it (or "
    "flatten_by_dtype of them), or as from_torch or from_keras returned it; for "
    "PyTorch Adam's coupled weight decay use "
    "optax_amsgrad.interop.coupled_weight_decay(weight_decay, solver), for "
    "several param groups optax_amsgrad.interop.partition(transforms, labels) "
    "in place of optax.chain and optax.partition."
)


def _constant(value: Any) -> Any:
  """A hyperparameter as a Python float where it is a number; schedules as
  they are."""
  if callable(value):
    return value
  return float(np.asarray(value))


def _core(options: _transform.Options) -> Facts:
  return Facts(
      convention=options.convention,
      b1=_constant(options.b1),
      b2=_constant(options.b2),
      eps=_constant(options.eps),
      eps_root=_constant(options.eps_root),
      learning_rate=None,
      weight_decay=0.0,
      decoupled=False,
      mu_dtype=options.mu_dtype,
      nu_dtype=options.nu_dtype,
  )


def leaf_facts(solver: Any, params: optax.Params) -> list[Facts]:
  """One :class:`Facts` per leaf of ``params`` (arrays, or anything shaped
  like them) for ``solver``; TypeError where the solver does not say."""
  update = getattr(solver, "update", None)
  n = len(jax.tree.leaves(params))
  if isinstance(update, DescribedUpdate):
    return update.facts(params)
  if isinstance(update, _transform.AmsgradUpdate):
    return [_core(update.options)] * n
  if isinstance(update, _step.OnePassUpdate):
    recipe = update.recipe
    core = _core(recipe.core.options)
    rate = recipe.learning_rate
    core = core._replace(learning_rate=None if callable(rate) else _constant(rate))
    if recipe.weight_decay is None:
      return [core] * n
    decays = jax.tree.leaves(_step._decay_tree(recipe, params))
    wd = _constant(recipe.weight_decay)
    return [core._replace(weight_decay=wd if decays[i] else 0.0, decoupled=True)
            for i in range(n)]
  raise TypeError(
      f"solver: cannot read what {type(solver).__qualname__} with update "
      f"{update!r} computes (an Optax wrapper hides its hyperparameters); "
      + _WHAT_TO_PASS
  )


def coupled_weight_decay(
    weight_decay: jax.typing.ArrayLike, solver: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(optax.add_decayed_weights(weight_decay), solver)``, which
  says what it is: PyTorch ``Adam``'s coupled (L2) weight decay, which adds
  ``weight_decay * params`` to the gradient before the moments.

  ``solver`` is an :func:`~optax_amsgrad.amsgrad` or
  :func:`~optax_amsgrad.scale_by_amsgrad` (no decay of its own).
  :func:`~optax_amsgrad.to_torch` can check this solver against a
  ``torch.optim.Adam(weight_decay=...)``, where it cannot read a plain
  ``optax.chain``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> from optax_amsgrad import interop
    >>> solver = interop.coupled_weight_decay(0.5, optax_amsgrad.amsgrad(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = solver.init(params)
    >>> updates, state = solver.update({"w": jnp.zeros(2)}, state, params)
    >>> updates["w"].round(6)  # the decay alone drives the first step: -0.1 * sign
    Array([-0.1, -0.1], dtype=float32)

  Args:
    weight_decay: the coupled weight decay, >= 0, a number.
    solver: the AMSGrad solver that follows it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  _validation.check_non_negative("weight_decay", weight_decay)
  chain = optax.chain(optax.add_decayed_weights(weight_decay), solver)

  def facts(params: optax.Params) -> list[Facts]:
    inner = leaf_facts(solver, params)
    if any(f.weight_decay != 0 for f in inner):
      raise ValueError(
          "coupled_weight_decay: the solver has a decoupled weight decay of its own "
          "(amsgradw); no framework optimizer applies both. Pass amsgrad or "
          "scale_by_amsgrad."
      )
    wd = _constant(weight_decay)
    return [f._replace(weight_decay=wd, decoupled=False) for f in inner]

  return optax.GradientTransformationExtraArgs(chain.init, DescribedUpdate(chain.update, facts))


def partition(
    transforms: Mapping[Hashable, optax.GradientTransformation],
    labels: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.partition(transforms, labels)``, which says what it is: each
  leaf takes the transformation of its label, as a PyTorch param group takes
  its own hyperparameters.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> from optax_amsgrad import interop
    >>> solver = interop.partition(
    ...     {"fast": optax_amsgrad.amsgrad(0.1), "slow": optax_amsgrad.amsgrad(0.01)},
    ...     {"w": "fast", "b": "slow"})
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> updates, _ = solver.update({"w": jnp.ones(2), "b": jnp.ones(2)},
    ...                            solver.init(params), params)
    >>> updates["w"].round(6), updates["b"].round(6)
    (Array([-0.1, -0.1], dtype=float32), Array([-0.01, -0.01], dtype=float32))

  Args:
    transforms: the transformations, by label, each one that
      :func:`~optax_amsgrad.to_torch` can read.
    labels: a tree of labels shaped like the params (or a prefix of them), or
      a function of the params returning one.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  solver = optax.partition(transforms, labels)

  def facts(params: optax.Params) -> list[Facts]:
    tree = labels(params) if callable(labels) else labels
    # The labels may be a prefix of the params, as for optax.partition.
    leaf_labels = jax.tree.leaves(jax.tree.map(
        lambda label, subtree: jax.tree.map(lambda _: label, subtree), tree, params))
    by_label = {label: leaf_facts(transforms[label], params) for label in set(leaf_labels)}
    return [by_label[label][i] for i, label in enumerate(leaf_labels)]

  return optax.GradientTransformationExtraArgs(solver.init, DescribedUpdate(solver.update, facts))


# --- Comparing with what the target computes ---------------------------------


def _same(ours: Any, theirs: Any, dtype: Any) -> bool:
  """Whether two hyperparameters are the same number once held as the target
  holds them (``dtype``: Keras keeps its learning rate in float32)."""
  if callable(ours) or callable(theirs):
    return ours is theirs
  return bool(np.asarray(ours, dtype) == np.asarray(theirs, dtype))


def differences(
    solver_facts: Sequence[Facts],
    target_facts: Sequence[Facts],
    names: Sequence[str],
    *,
    learning_rate_dtype: Any = np.float64,
) -> list[str]:
  """Each difference between what the solver computes and what the target
  does, leaf by leaf (``names[i]`` says which leaf), one line per
  difference, leaves with the same difference together. A solver's
  ``learning_rate`` of None (a schedule, or none) and a target's of None (an
  LR scheduler) are not compared."""
  found: dict[str, list[str]] = {}
  for name, ours, theirs in zip(names, solver_facts, target_facts, strict=True):
    lines = []
    for field in ("convention", "b1", "b2", "eps", "eps_root"):
      a, b = getattr(ours, field), getattr(theirs, field)
      same = a == b if field == "convention" else _same(a, b, np.float64)
      if not same:
        lines.append(f"{field}: the solver has {a!r}, the target {b!r}")
    if (ours.learning_rate is not None and theirs.learning_rate is not None
        and not _same(ours.learning_rate, theirs.learning_rate, learning_rate_dtype)):
      lines.append(f"learning_rate: the solver has {ours.learning_rate!r}, the target "
                   f"{theirs.learning_rate!r}")
    lines.extend(_decay_differences(ours, theirs))
    for line in lines:
      found.setdefault(line, []).append(name)
  return [f"{line} ({', '.join(where)})" for line, where in found.items()]


def _decay_form(facts: Facts) -> str:
  if facts.weight_decay == 0:
    return "no weight decay"
  form = "decoupled" if facts.decoupled else "coupled"
  return f"{form} weight_decay={facts.weight_decay!r}"


def _decay_differences(ours: Facts, theirs: Facts) -> list[str]:
  if _decay_form(ours) == _decay_form(theirs):
    return []
  return [f"weight decay: the solver has {_decay_form(ours)}, the target {_decay_form(theirs)}"]


def _format(leaf: Any) -> str:
  """How a state leaf is stored, as a dtype option names it."""
  if _blockwise.is_quantized(leaf):
    return "int8 (8-bit blocks)"
  return jnp.dtype(jnp.result_type(leaf)).name


def _storage_difference(buffer: str, asked: Any, leaf: Any) -> str | None:
  """How the stored ``leaf`` differs from what ``{buffer}_dtype=asked``
  stores; None when it is what the solver stores. With ``"int8"``, leaves
  too small for blocks stay in the compute dtype (``_blockwise.eligible``)."""
  quantized = _blockwise.is_quantized(leaf)
  if _blockwise.is_int8(asked):
    shape, dtype = tuple(jnp.shape(leaf.codes if quantized else leaf)), jnp.result_type(leaf)
    if quantized or not _blockwise.eligible(shape, dtype):
      return None
    wanted = "int8 (8-bit blocks)"
  elif quantized:
    wanted = "the params' dtype" if asked is None else jnp.dtype(asked).name
  elif asked is not None and _real(asked) != _real(jnp.result_type(leaf)):
    wanted = jnp.dtype(asked).name
  else:
    return None
  return f"{buffer}_dtype: the solver stores {wanted}, the state holds {_format(leaf)}"


def storage_differences(
    solver_facts: Sequence[Facts],
    state_leaves: Sequence[tuple[Any, Any]],
    target_dtypes: Sequence[Any],
    names: Sequence[str],
    target: str,
) -> list[str]:
  """Each leaf whose stored moments the target cannot hold as they are:
  the state's ``(mu, nu)`` leaves (arrays, or 8-bit blocks) against the
  solver's storage options (the state must be the solver's), and the values
  the step reads from them (8-bit blocks decode to float32) against the
  target's dtype (narrower moments widen exactly; wider ones would be
  rounded)."""
  found: dict[str, list[str]] = {}
  for name, facts, (mu, nu), theirs in zip(
      names, solver_facts, state_leaves, target_dtypes, strict=True):
    lines = []
    for buffer, asked, leaf in (("mu", facts.mu_dtype, mu), ("nu", facts.nu_dtype, nu)):
      line = _storage_difference(buffer, asked, leaf)
      if line is not None:
        lines.append(line)
      quantized = _blockwise.is_quantized(leaf)
      read = jnp.dtype(jnp.float32 if quantized else jnp.result_type(leaf))
      if _real(read).itemsize > _real(theirs).itemsize:
        held = f"{_format(leaf)}, read as {read.name}" if quantized else read.name
        lines.append(f"storage: the state's {buffer} is {held}, the {target} keeps "
                     f"{jnp.dtype(theirs).name} (it would be rounded)")
    for line in lines:
      found.setdefault(line, []).append(name)
  return [f"{line} ({', '.join(where)})" for line, where in found.items()]


def _real(dtype: Any) -> np.dtype:
  real: np.dtype = np.real(np.zeros((), jnp.dtype(dtype))).dtype
  return real


def refuse(differences_found: Sequence[str], target: str) -> None:
  """ValueError naming every difference, if there are any."""
  if differences_found:
    raise ValueError(
        f"The solver does not compute what the {target} computes, so the run would "
        "not continue on its trajectory:\n  " + "\n  ".join(differences_found)
        + f"\nPass the solver the state was made with, and a {target} with the same "
        "hyperparameters; the target's are not overwritten."
    )
