"""Jitted training loops over every public optimizer of the package, counting
what each compiles: shared by tests/test_optax_citizen.py (one device) and
tests/scale_out/one_compile.py (sharded params on eight host devices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

import optax_amsgrad

# The optimizers of the package and of Optax around it. Optax's own
# transformations that count steps (schedules in a chain, inject_hyperparams)
# make their counters uncommitted in an eager init: with committed params
# those are placed by a jitted init (JITTED_INIT), as the README says.
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "amsgrad": lambda: optax_amsgrad.amsgrad(1e-2),
    "amsgradw": lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2),
    "schedule": lambda: optax_amsgrad.amsgrad(optax.cosine_decay_schedule(1e-2, 10)),
    "bfloat16_state": lambda: optax_amsgrad.amsgrad(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    # 8-bit state: leaves of at least _blockwise.MIN_SIZE elements are stored
    # in blocks (the tests give it such leaves), smaller ones in float32.
    "int8_state": lambda: optax_amsgrad.amsgrad(1e-2, mu_dtype="int8", nu_dtype="int8"),
    "chain": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax_amsgrad.scale_by_amsgrad(),
        optax.scale_by_learning_rate(optax.linear_schedule(1e-2, 1e-3, 10)),
    ),
    "flatten_by_dtype": lambda: optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-2)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax_amsgrad.amsgrad)(
        learning_rate=1e-2
    ),
}

JITTED_INIT = ("chain", "inject_hyperparams")

STEPS = 3


def init(solver: optax.GradientTransformation, params: Any, how: str) -> Any:
  """``solver.init`` called eagerly or jitted."""
  return jax.jit(solver.init)(params) if how == "jit" else solver.init(params)


def compiles_over_a_loop(
    solver: optax.GradientTransformation,
    params: Any,
    *,
    call: str,
    donate: bool,
    init_how: str = "eager",
) -> int:
  """Runs ``STEPS`` jitted steps from ``init`` and returns how many executables
  the step compiled; fails (chex) if the step's Python is traced twice."""
  state = init(solver, params, init_how)
  # chex counts traces by the function's code, the same at every call here.
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def step(params: Any, state: Any, scale: jax.Array) -> tuple[Any, Any]:
    grads = jax.tree.map(lambda p: scale * jnp.cos(p), params)
    if call == "apply_step":
      return optax_amsgrad.apply_step(solver, grads, state, params)
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  for i in range(STEPS):
    params, state = jitted(params, state, jnp.float32(i + 1))
  jax.block_until_ready((params, state))
  size: int = jitted._cache_size()  # type: ignore[attr-defined]
  return size


def train_step(solver: optax.GradientTransformation) -> Callable[..., Any]:
  """``(params, state, grads) -> (params, state)`` by ``update`` and
  ``optax.apply_updates``."""
  def step(params: Any, state: Any, grads: Any) -> Any:
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def apply_step(solver: optax.GradientTransformation) -> Callable[..., Any]:
  """The same step by ``optax_amsgrad.apply_step``."""
  return lambda params, state, grads: optax_amsgrad.apply_step(solver, grads, state, params)
