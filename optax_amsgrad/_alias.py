"""Ready-to-use optimizers: the AMSGrad core chained with a learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_amsgrad import _placement, _step, _validation
from optax_amsgrad._transform import (
    Convention,
    Implementation,
    ScalarOrSchedule,
    StateRounding,
    scale_by_amsgrad,
)


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    convention: Convention = "pytorch",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    state_rounding: StateRounding = "stochastic",
    seed: int = 0,
    implementation: Implementation | None = None,
) -> optax.GradientTransformation:
  """The AMSGrad optimizer (Reddi, Kale and Kumar, 2018).

  ``optax.chain(scale_by_amsgrad(...), optax.scale_by_learning_rate(lr))``:
  see :func:`scale_by_amsgrad` for the conventions and the options. With
  ``convention="pytorch"`` it follows ``torch.optim.Adam(amsgrad=True)``; for
  PyTorch's coupled ``weight_decay``, put ``optax.add_decayed_weights(wd)`` in
  front of it.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> def loss(params):
    ...   return jnp.sum((params - 3.0) ** 2)
    >>> solver = optax_amsgrad.amsgrad(learning_rate=0.1)
    >>> params = jnp.zeros(2)
    >>> state = solver.init(params)
    >>> for _ in range(200):
    ...   updates, state = solver.update(jax.grad(loss)(params), state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params, 3.0, atol=0.05))
    True

  Args:
    learning_rate: a float or an Optax schedule ``count -> learning rate``.
    b1: decay of the first moment (a schedule with ``convention="paper"``).
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    convention: ``"pytorch"`` (default), ``"keras"``, ``"optax"`` or
      ``"paper"``.
    mu_dtype: storage dtype of the first moment.
    nu_dtype: storage dtype of the second moment and its maximum.
    state_rounding: ``"stochastic"`` or ``"nearest"`` for narrow storage.
    seed: seed of the stochastic rounding.
    implementation: ``"xla"``, ``"cpu"`` (the CPU kernel) or None (the kernel
      where it was built and the backend is the CPU); see
      :func:`scale_by_amsgrad`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Reddi, Kale and Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  _validation.check_learning_rate(learning_rate)
  core = scale_by_amsgrad(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      convention=convention,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      state_rounding=state_rounding,
      seed=seed,
      implementation=implementation,
  )
  solver = optax.chain(core, optax.scale_by_learning_rate(learning_rate))
  return _step.one_pass(_placement.with_placed_init(solver), core, learning_rate)


def amsgradw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: jax.typing.ArrayLike = 1e-2,
    *,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    convention: Convention = "pytorch",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    state_rounding: StateRounding = "stochastic",
    seed: int = 0,
    implementation: Implementation | None = None,
) -> optax.GradientTransformation:
  """AMSGrad with decoupled weight decay, as ``torch.optim.AdamW(amsgrad=True)``.

  Each step is ``params <- params - learning_rate * (u + weight_decay *
  params)`` with ``u`` the AMSGrad update: the same as PyTorch's
  ``params <- params * (1 - lr * wd) - lr * u`` and as Keras'
  ``weight_decay``. The default ``weight_decay`` is PyTorch ``AdamW``'s.
  ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> solver = optax_amsgrad.amsgradw(learning_rate=0.1, weight_decay=0.5)
    >>> params = {"w": jnp.ones(3), "b": jnp.zeros(3)}
    >>> state = solver.init(params)
    >>> grads = {"w": jnp.zeros(3), "b": jnp.zeros(3)}
    >>> updates, state = solver.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.95, 0.95, 0.95], dtype=float32)

  Args:
    learning_rate: a float or an Optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay, >= 0.
    mask: a tree of booleans shaped like the params, or a function of the
      params returning one, selecting the leaves that decay (for example
      excluding biases and norms).
    convention: see :func:`scale_by_amsgrad`.
    mu_dtype: storage dtype of the first moment.
    nu_dtype: storage dtype of the second moment and its maximum.
    state_rounding: ``"stochastic"`` or ``"nearest"`` for narrow storage.
    seed: seed of the stochastic rounding.
    implementation: ``"xla"``, ``"cpu"`` (the CPU kernel) or None (the kernel
      where it was built and the backend is the CPU); see
      :func:`scale_by_amsgrad`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Reddi, Kale and Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_non_negative("weight_decay", weight_decay)
  core = scale_by_amsgrad(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      convention=convention,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      state_rounding=state_rounding,
      seed=seed,
      implementation=implementation,
  )
  solver = optax.chain(
      core,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _step.one_pass(
      _placement.with_placed_init(solver), core, learning_rate, weight_decay, mask
  )
