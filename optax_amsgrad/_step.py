"""A whole optimizer step, update and ``apply_updates``, in one pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from optax_amsgrad import _transform, cpu


class _Recipe(NamedTuple):
  """What ``amsgrad``/``amsgradw`` chained, for :func:`apply_step`; ``flat``
  when wrapped in ``flatten_by_dtype``."""

  core: _transform.AmsgradUpdate
  learning_rate: optax.ScalarOrSchedule
  weight_decay: jax.typing.ArrayLike | None
  mask: Any
  flat: bool = False


class ForwardingUpdate:
  """An update function that calls ``update`` as Optax calls any update;
  subclasses carry what the optimizer is made of, which a wrapper that
  replaces the update function (``optax.chain``, ``optax.masked``, ...)
  hides."""

  def __init__(self, update: Callable[..., Any]) -> None:
    self._update = update

  def __call__(
      self,
      updates: optax.Updates,
      state: optax.OptState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    result: tuple[optax.Updates, optax.OptState] = self._update(
        updates, state, params, **extra_args
    )
    return result


class OnePassUpdate(ForwardingUpdate):
  """The update function of an optimizer that :func:`apply_step` can take in
  one pass (``amsgrad``, ``amsgradw``, and those in ``flatten_by_dtype``),
  carrying its :class:`_Recipe`; hidden by a wrapper, ``apply_step`` takes
  the two calls."""

  def __init__(self, update: Callable[..., Any], recipe: _Recipe) -> None:
    super().__init__(update)
    self.recipe = recipe


def one_pass(
    solver: optax.GradientTransformationExtraArgs,
    core: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike | None = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """``solver``, which is ``core`` (a ``scale_by_amsgrad``), then
  ``add_decayed_weights(weight_decay, mask)`` unless ``weight_decay`` is None,
  then ``scale_by_learning_rate(learning_rate)``, with an update that says
  so."""
  assert isinstance(core.update, _transform.AmsgradUpdate)
  recipe = _Recipe(core.update, learning_rate, weight_decay, mask)
  return optax.GradientTransformationExtraArgs(solver.init, OnePassUpdate(solver.update, recipe))


def flat_update(
    update: Callable[..., Any],
    inner: optax.GradientTransformation,
    implementation: cpu.Implementation | None,
) -> Callable[..., Any]:
  """The update of ``flatten_by_dtype(inner, implementation=...)``: a
  :class:`OnePassUpdate` when ``inner`` was made by ``amsgrad``/``amsgradw``
  without a mask (a mask would see the flat buffers, not the params) and the
  one pass takes the CPU kernel, ``update`` itself otherwise."""
  chosen = None if implementation is None else cpu.choose(implementation)
  if not isinstance(inner.update, OnePassUpdate) or inner.update.recipe.mask is not None:
    return update
  recipe = inner.update.recipe
  if chosen == "cpu" and recipe.core.options.implementation != "cpu":
    raise ValueError(
        "flatten_by_dtype(implementation='cpu') wraps an optimizer built with "
        "implementation='xla': its one pass could not take the kernel. Build the "
        "wrapped optimizer with implementation='cpu' (or None)."
    )
  if chosen == "xla":
    return update
  return OnePassUpdate(update, recipe._replace(flat=True))


def _decay_tree(recipe: _Recipe, params: optax.Params) -> Any:
  """Where the weight decay applies, one bool per param leaf."""
  weight_decay = recipe.weight_decay
  no_decay = weight_decay is None or (
      isinstance(weight_decay, (int, float)) and weight_decay == 0.0
  )
  if no_decay or recipe.mask is None:
    return jax.tree.map(lambda _: not no_decay, params)
  mask = recipe.mask(params) if callable(recipe.mask) else recipe.mask
  # The mask may be a prefix of the params, as for optax.masked.
  return jax.tree.map(
      lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree), mask, params
  )


def apply_step(
    solver: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
) -> tuple[optax.Params, optax.OptState]:
  """One optimizer step: the params and state after it.

  The same as::

    updates, state = solver.update(grads, state, params)
    params = optax.apply_updates(params, updates)

  For a solver made by :func:`amsgrad` or :func:`amsgradw` (not wrapped, or
  wrapped only in :func:`flatten_by_dtype` without a mask) with
  ``implementation="cpu"`` (the default on CPU where the kernel was built),
  each float32 or float64 leaf is updated in one pass over memory: the
  moments, the update and the params together (36 bytes per float32 param,
  the least an AMSGrad step can move, against 44 through ``update`` and
  ``apply_updates``), and so is each leaf with 8-bit state (``mu_dtype`` and
  ``nu_dtype`` ``"int8"``) on a single device: its codes, the update and the
  params, block by block. Everywhere else (``implementation="xla"``, GPUs and
  TPUs, other solvers) it is exactly the two calls above, and returns their
  bits.

  What the kernel returns: every operation rounded as written in the update
  and in Optax's ``add_decayed_weights``, ``scale_by_learning_rate`` and
  ``apply_updates``. That is the result of ``update`` and ``apply_updates``
  compiled as separate functions: bit for bit with a constant learning rate
  and no weight decay, and otherwise within one unit in the last place of
  the params (XLA fuses the decay and the schedule's scale its own way).
  Compiled together in one function, XLA may fold the learning rate into
  the bias correction, so their results and the kernel's then differ by a
  few roundings of the step, as any two XLA programs of the same arithmetic
  may. Leaves the kernel does not cover
  (float16, bfloat16 and complex params) take the arithmetic of ``update``
  and ``apply_updates`` in the same pass.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_amsgrad
    >>> solver = optax_amsgrad.amsgrad(learning_rate=0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = solver.init(params)
    >>> @jax.jit
    ... def train_step(params, state):
    ...   grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    ...   return optax_amsgrad.apply_step(solver, grads, state, params)
    >>> params, state = train_step(params, state)
    >>> params["w"].round(6)  # first step: -0.1 * sign(g)
    Array([ 0.9, -1.9], dtype=float32)

  Args:
    solver: any :class:`optax.GradientTransformation`.
    grads: the gradients, shaped like ``params``.
    state: the solver's state.
    params: the params before the step.

  Raises:
    ValueError: if ``params`` is None.

  Returns:
    ``(params, state)`` after the step. Under ``jax.jit`` with ``params`` and
    ``state`` donated, both are updated in place.
  """
  if params is None:
    raise ValueError(
        "apply_step needs the params: it returns them after the step."
    )
  if not isinstance(solver.update, OnePassUpdate):
    return _two_calls(solver, grads, state, params)
  recipe = solver.update.recipe
  if recipe.core.options.implementation != "cpu":
    # XLA fuses the two calls by itself; taking them keeps the same bits.
    return _two_calls(solver, grads, state, params)
  chain_state = state.inner_state if recipe.flat else state
  core_state, *middle, rate_state = chain_state
  learning_rate = recipe.learning_rate
  rate = (
      learning_rate(rate_state.count)
      if callable(learning_rate) else learning_rate
  )
  applying = _transform.Applying(
      step_size=-1 * rate,
      weight_decay=0.0 if recipe.weight_decay is None else recipe.weight_decay,
      decay=_decay_tree(recipe, params),
  )
  apply = recipe.core.apply_flat if recipe.flat else recipe.core.apply
  result = apply(grads, core_state, params, applying)
  if result is None:
    return _two_calls(solver, grads, state, params)
  new_params, new_core_state = result
  # The learning rate's state: a step count for schedules, empty otherwise.
  # A constant weight decay's state does not change.
  _, new_rate_state = optax.scale_by_learning_rate(learning_rate).update({}, rate_state)
  new_state = (new_core_state, *middle, new_rate_state)
  return new_params, state._replace(inner_state=new_state) if recipe.flat else new_state


def _two_calls(
    solver: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
) -> tuple[optax.Params, optax.OptState]:
  updates, state = solver.update(grads, state, params)
  return optax.apply_updates(params, updates), state
