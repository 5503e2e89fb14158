"""The synthetic problems on which Adam fails, from Reddi, Kale and Kumar (2018).

Every problem is a sequence of linear losses ``f_t(x) = g_t * x`` on the box
``F = [lower, upper]`` (``[-1, 1]`` in the paper), where ``g_t`` is either a
rare ``large`` positive gradient or a common ``small`` negative one:

* :func:`online`: ``f_t(x) = 1010 x`` if ``t mod 101 == 1`` else ``-10 x``
  (Section 5, Figure 1, left and centre);
* :func:`stochastic`: ``1010 x`` with probability 0.01, else ``-10 x``
  (Section 5, Figure 1, right);
* :func:`theorem1`: ``C x`` if ``t mod 3 == 1`` else ``-x``, with ``C > 2``
  (Theorem 1; Adam fails with ``b1 = 0`` and ``b2 = 1 / (1 + C**2)``, see
  :func:`theorem1_betas`).

The average gradient is positive, so the best fixed point is ``x = -1``, yet
Adam drifts to ``x = +1``, the worst point, while AMSGrad goes to ``-1``.

:func:`run` runs any Optax optimizer on a problem as one compiled
``jax.lax.scan``, projecting onto ``F`` after every step (for a box the clip is
the exact weighted projection of the paper), and returns the iterates ``x_t``
and the average regret ``R_t / t``.

Example:
  >>> import optax
  >>> import optax_amsgrad
  >>> from optax_amsgrad import problems
  >>> lr = problems.inverse_sqrt_schedule(0.5)
  >>> adam = problems.run(problems.online(), optax.adam(lr, b1=0.9, b2=0.99),
  ...                     200_000, record_every=1_000)
  >>> ams = problems.run(problems.online(),
  ...                    optax_amsgrad.amsgrad(lr, b1=0.9, b2=0.99),
  ...                    200_000, record_every=1_000)
  >>> bool(adam.x[-1] > 0.9), bool(ams.x[-1] < -0.9)
  (True, True)

Reference:
  Reddi, Kale and Kumar, `On the Convergence of Adam and Beyond
  <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LinearProblem",
    "Trajectory",
    "inverse_sqrt_schedule",
    "online",
    "run",
    "stochastic",
    "theorem1",
    "theorem1_betas",
]


@dataclasses.dataclass(frozen=True)
class LinearProblem:
  """Linear losses ``f_t(x) = g_t * x`` on the box ``[lower, upper]``.

  ``g_t`` is ``large`` when ``t mod period == 1`` (with ``period``) or with
  probability ``probability`` (a fresh draw per step), and ``small`` otherwise.
  Exactly one of ``period`` and ``probability`` is set. ``t`` counts from 1.

  The dataclass is frozen and compares by value, so runs of equal problems
  share one compiled program.

  Attributes:
    name: a short label, for tables and plots.
    large: the rare (positive) gradient.
    small: the common (negative) gradient.
    period: deterministic problems: ``large`` comes when ``t % period == 1``.
    probability: stochastic problems: the chance of ``large`` at each step.
    lower: lower end of the box ``F``.
    upper: upper end of the box ``F``.

  Examples:
    >>> from optax_amsgrad import problems
    >>> problem = problems.LinearProblem(name="spiky", large=3.0, small=-1.0, period=3)
    >>> problem == problems.theorem1(3.0)
    False
    >>> problem.period, problem.lower, problem.upper
    (3, -1.0, 1.0)
  """

  name: str
  large: float
  small: float
  period: int | None = None
  probability: float | None = None
  lower: float = -1.0
  upper: float = 1.0

  def __post_init__(self) -> None:
    if (self.period is None) == (self.probability is None):
      raise ValueError("Set exactly one of period and probability.")
    if self.period is not None and (
        isinstance(self.period, bool)
        or not isinstance(self.period, (int, np.integer))
        or self.period < 2
    ):
      raise ValueError(f"period must be an integer >= 2; got {self.period!r}.")
    if self.probability is not None and not 0.0 < self.probability < 1.0:
      raise ValueError(
          f"probability must be in the open interval (0, 1); got "
          f"{self.probability!r}."
      )
    for name in ("large", "small", "lower", "upper"):
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f"{name} must be finite; got {getattr(self, name)!r}.")
    if not self.lower < self.upper:
      raise ValueError(
          f"lower must be below upper; got [{self.lower!r}, {self.upper!r}]."
      )

  @property
  def is_stochastic(self) -> bool:
    """Whether the gradients are random (a PRNG key is then needed)."""
    return self.probability is not None

  @property
  def mean_gradient(self) -> float:
    """Average of ``g_t`` over a period, or its expectation."""
    if self.period is not None:
      return (self.large + (self.period - 1) * self.small) / self.period
    assert self.probability is not None
    return self.probability * self.large + (1 - self.probability) * self.small

  @property
  def optimum(self) -> float:
    """The best fixed point: an end of the box, against the mean gradient."""
    return self.lower if self.mean_gradient > 0 else self.upper

  def gradient(self, t: jax.typing.ArrayLike, key: jax.Array) -> jax.Array:
    """``g_t``, the derivative of ``f_t``, for the step ``t`` (from 1).

    Stochastic problems draw step ``t`` from ``jax.random.fold_in(key, t)``,
    so the sequence does not depend on how a run is split or recorded.
    """
    t = jnp.asarray(t)
    if self.period is not None:
      is_large = t % self.period == 1
    else:
      # An explicit float32 draw: the default dtype would follow
      # jax_enable_x64 and change the sequence with it.
      draw = jax.random.uniform(jax.random.fold_in(key, t), (), jnp.float32)
      is_large = draw < cast(float, self.probability)
    return jnp.where(is_large, self.large, self.small)


def online(
    large: float = 1010.0, small: float = -10.0, period: int = 101
) -> LinearProblem:
  """The online problem of Section 5: ``1010 x`` if ``t mod 101 == 1`` else
  ``-10 x`` on ``[-1, 1]``; the best fixed point is ``x = -1``.

  Args:
    large: the rare gradient, seen once every ``period`` steps.
    small: the gradient of the other steps.
    period: the length of the cycle; the large gradient is at ``t mod period == 1``.

  Returns:
    A :class:`LinearProblem`.

  Example:
    >>> from optax_amsgrad import problems
    >>> problem = problems.online()
    >>> [float(problem.gradient(t, None)) for t in (1, 2, 101, 102)]
    [1010.0, -10.0, -10.0, 1010.0]
  """
  return LinearProblem("online", float(large), float(small), period=period)


def stochastic(
    probability: float = 0.01, large: float = 1010.0, small: float = -10.0
) -> LinearProblem:
  """The stochastic problem of Section 5: ``1010 x`` with probability 0.01,
  else ``-10 x``, on ``[-1, 1]``; the minimiser of the expected loss is
  ``x = -1``. Runs need a PRNG key.

  Args:
    probability: the chance of the large gradient at each step.
    large: the rare gradient.
    small: the gradient of the other steps.

  Returns:
    A :class:`LinearProblem`.

  Example:
    >>> import jax
    >>> from optax_amsgrad import problems
    >>> problem = problems.stochastic()
    >>> g = jax.vmap(problem.gradient, (0, None))(
    ...     jax.numpy.arange(1, 100_001), jax.random.key(0))
    >>> 0.008 < float((g > 0).mean()) < 0.012
    True
  """
  return LinearProblem(
      "stochastic", float(large), float(small), probability=float(probability)
  )


def theorem1(c: float = 3.0) -> LinearProblem:
  """The construction of Theorem 1: ``C x`` if ``t mod 3 == 1`` else ``-x``
  on ``[-1, 1]``, with ``C > 2`` so that the best fixed point is ``x = -1``.
  Adam with ``b1, b2 = theorem1_betas(C)`` and step ``alpha / sqrt(t)``
  converges to ``x = +1``.

  Args:
    c: the large gradient ``C``; the construction needs ``C > 2``.

  Returns:
    A :class:`LinearProblem`.

  Example:
    >>> from optax_amsgrad import problems
    >>> problems.theorem1(3.0).mean_gradient
    0.3333333333333333
  """
  c = float(c)
  if not c > 2.0 or not math.isfinite(c):
    raise ValueError(f"Theorem 1 needs a finite C > 2; got C={c!r}.")
  return LinearProblem("theorem1", c, -1.0, period=3)


def theorem1_betas(c: float = 3.0) -> tuple[float, float]:
  """``(b1, b2) = (0, 1 / (1 + C**2))``, the decays under which Theorem 1
  shows that Adam fails on :func:`theorem1`.

  Args:
    c: the ``C`` of :func:`theorem1`.

  Returns:
    ``(b1, b2)``.

  Example:
    >>> from optax_amsgrad import problems
    >>> problems.theorem1_betas(3.0)
    (0.0, 0.1)
  """
  return 0.0, 1.0 / (1.0 + float(c) ** 2)


def inverse_sqrt_schedule(alpha: float) -> optax.Schedule:
  """The step size ``alpha / sqrt(t)`` of the paper's analysis, ``t`` from 1.

  Optax calls a schedule with the number of steps already taken, so the
  ``t``-th step uses ``count = t - 1``.

  Args:
    alpha: the step size at ``t = 1``; finite and > 0.

  Returns:
    An Optax schedule ``count -> alpha / sqrt(count + 1)``.

  Example:
    >>> from optax_amsgrad import problems
    >>> schedule = problems.inverse_sqrt_schedule(0.5)
    >>> [float(schedule(count)) for count in (0, 3)]
    [0.5, 0.25]
  """
  alpha = float(alpha)
  if not alpha > 0 or not math.isfinite(alpha):
    raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}.")

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    # A weakly typed float: the step takes the dtype of the updates it scales.
    step: jax.Array = alpha / jnp.sqrt(jnp.asarray(count) + 1.0)
    return step

  return schedule


class Trajectory(NamedTuple):
  """The record of :func:`run`, at the steps ``t``.

  Attributes:
    t: the recorded steps (int32): ``record_every, 2 * record_every, ...``,
      and ``num_steps`` last.
    x: the iterate ``x_t`` at those steps: the point at which ``f_t`` is
      evaluated (``x_1 = x0``).
    average_regret: ``R_t / t`` with ``R_t = sum_{s <= t} f_s(x_s) - f_s(x*)``
      and ``x*`` the problem's best fixed point.
    final_x: ``x_{T+1}``, the iterate after the last step.
    trace: ``trace(state)`` of the optimizer state after step ``t``, stacked
      along a leading axis, or ``None`` without ``trace``.

  Examples:
    >>> import optax_amsgrad
    >>> from optax_amsgrad import problems
    >>> run = problems.run(problems.online(), optax_amsgrad.amsgrad(0.1), 300,
    ...                    record_every=100)
    >>> run.t.tolist(), run.x.shape, run.trace is None
    ([100, 200, 300], (3,), True)
  """

  t: jax.Array
  x: jax.Array
  average_regret: jax.Array
  final_x: jax.Array
  trace: Any


class _Carry(NamedTuple):
  x: jax.Array
  opt_state: optax.OptState
  regret: jax.Array
  # Kahan compensation: millions of float32 additions would otherwise lose
  # the small average regret to round-off.
  regret_error: jax.Array
  played: jax.Array


def _check_count(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}.")
  if value < 1:
    raise ValueError(f"{name} must be >= 1; got {value!r}.")
  return operator.index(value)


def run(
    problem: LinearProblem,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    key: jax.Array | None = None,
    x0: jax.typing.ArrayLike = 0.0,
    record_every: int = 1,
    dtype: jax.typing.DTypeLike = jnp.float32,
    trace: Callable[[optax.OptState], Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Trajectory:
  """Runs ``optimizer`` on ``problem`` for ``num_steps`` projected steps.

  Step ``t`` plays ``x_t``, receives ``g_t = problem.gradient(t, key)``, and
  sets ``x_{t+1} = clip(x_t + u_t, lower, upper)`` with ``u_t`` the
  optimizer's update (``optax.projections.projection_box``). The whole run is
  one compiled ``jax.lax.scan`` (a scan over blocks of ``record_every`` steps,
  each an inner scan), so it can be jitted or vmapped further, for example over
  keys.

  Args:
    problem: the losses, for example :func:`online` or :func:`stochastic`.
    optimizer: any Optax optimizer, learning rate included; it sees a scalar
      parameter ``x``. Runs are compiled once per distinct (hashable)
      optimizer object, so reuse the object between runs.
    num_steps: the number of steps ``T``.
    key: a PRNG key; required by stochastic problems, unused otherwise.
    x0: the starting point ``x_1``, inside the box.
    record_every: record ``x_t``, ``R_t / t`` and the trace every so many
      steps (and at ``T``), to keep long runs small in memory. Gradients are
      drawn a block of ``record_every`` steps at a time, so larger blocks also
      run stochastic problems faster; the draws themselves do not change.
    dtype: the dtype of ``x`` and of the gradients.
    trace: optional function of the optimizer state to record, for example
      ``lambda s: optax.tree.get(s, "nu")``.
    progress: optional host callback, called with the number of steps done
      after every recorded block (through ``jax.debug.callback``).

  Returns:
    A :class:`Trajectory`.

  Example:
    >>> import optax
    >>> from optax_amsgrad import problems
    >>> result = problems.run(problems.theorem1(), optax.sgd(0.1), 9)
    >>> result.t.tolist()
    [1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> [round(float(x), 3) for x in result.x[:4]]
    [0.0, -0.3, -0.2, -0.1]
  """
  if not isinstance(problem, LinearProblem):
    raise TypeError(
        f"problem must be a LinearProblem, for example problems.online(); got "
        f"{type(problem).__name__}."
    )
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        "optimizer must be an optax.GradientTransformation; got "
        f"{type(optimizer).__name__}."
    )
  num_steps = _check_count("num_steps", num_steps)
  record_every = _check_count("record_every", record_every)
  if num_steps >= 2**31 - 1:
    raise ValueError(f"num_steps must be below 2**31 - 1; got {num_steps}.")
  if key is None:
    if problem.is_stochastic:
      raise ValueError(
          f"The {problem.name!r} problem is stochastic: pass key=jax.random.key(seed)."
      )
    key = jax.random.key(0)
  if not isinstance(x0, jax.core.Tracer):
    start = float(np.asarray(x0))
    if not problem.lower <= start <= problem.upper:
      raise ValueError(
          f"x0 must lie in [{problem.lower}, {problem.upper}]; got {start!r}."
      )
  trajectory: Trajectory = _run(
      problem,
      optimizer,
      num_steps,
      record_every,
      jnp.dtype(dtype),
      trace,
      progress,
      key,
      jnp.asarray(x0, dtype),
  )
  return trajectory


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _run(
    problem: LinearProblem,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    record_every: int,
    dtype: jnp.dtype,
    trace: Callable[[optax.OptState], Any] | None,
    progress: Callable[[int], None] | None,
    key: jax.Array,
    x0: jax.Array,
) -> Trajectory:
  optimum = jnp.asarray(problem.optimum, dtype)
  gradient = jax.vmap(problem.gradient, in_axes=(0, None))

  def step(carry: _Carry, g: jax.Array) -> tuple[_Carry, None]:
    # Kahan summation of f_t(x_t) - f_t(x*) = g_t (x_t - x*).
    term = g * (carry.x - optimum) - carry.regret_error
    regret = carry.regret + term
    regret_error = (regret - carry.regret) - term
    updates, opt_state = optimizer.update(g, carry.opt_state, carry.x)
    x = optax.projections.projection_box(
        optax.apply_updates(carry.x, updates), problem.lower, problem.upper
    )
    return _Carry(x, opt_state, regret, regret_error, carry.x), None

  def block(carry: _Carry, first: jax.Array, size: int) -> tuple[_Carry, Any]:
    # The gradients of a block are drawn at once, vectorised: much faster than
    # one draw per scan step, and the same numbers (each step has its own key).
    t = first + jnp.arange(size, dtype=jnp.int32)
    carry, _ = jax.lax.scan(step, carry, gradient(t, key).astype(dtype))
    last = first + size - 1
    if progress is not None:
      jax.debug.callback(progress, last)
    record = (
        last,
        carry.played,
        carry.regret / last.astype(dtype),
        None if trace is None else trace(carry.opt_state),
    )
    return carry, record

  zero = jnp.zeros([], dtype)
  carry = _Carry(x0, optimizer.init(x0), zero, zero, x0)
  num_blocks, rest = divmod(num_steps, record_every)
  records = []
  if num_blocks:
    starts = 1 + record_every * jnp.arange(num_blocks, dtype=jnp.int32)
    carry, stacked = jax.lax.scan(
        lambda c, first: block(c, first, record_every), carry, starts
    )
    records.append(stacked)
  if rest:
    carry, last = block(carry, jnp.int32(1 + num_blocks * record_every), rest)
    records.append(jax.tree.map(lambda r: jnp.expand_dims(r, 0), last))
  t, x, average_regret, traced = jax.tree.map(
      lambda *parts: jnp.concatenate(parts), *records
  )
  return Trajectory(t, x, average_regret, carry.x, traced)
