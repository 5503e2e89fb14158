"""Runs an Optax optimizer over a fixed gradient sequence in one lax.scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_amsgrad


def run_optax(
    optimizer: optax.GradientTransformation,
    grads: list[dict[str, np.ndarray]],
    params: dict[str, np.ndarray],
    *,
    dtype=None,
    apply_step: bool = False,
) -> list[dict[str, np.ndarray]]:
  """Params after each step, as NumPy arrays (same layout as reference.py).

  Each step is ``optimizer.update`` then ``optax.apply_updates``, or with
  ``apply_step`` one call of ``optax_amsgrad.apply_step``."""
  cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
  params = jax.tree.map(cast, params)
  stacked = jax.tree.map(lambda *g: cast(np.stack(g)), *grads)

  @jax.jit
  def run(params, stacked):
    def step(carry, g):
      params, state = carry
      if apply_step:
        params, state = optax_amsgrad.apply_step(optimizer, g, state, params)
      else:
        updates, state = optimizer.update(g, state, params)
        params = optax.apply_updates(params, updates)
      return (params, state), params

    _, history = jax.lax.scan(step, (params, optimizer.init(params)), stacked)
    return history

  history = jax.device_get(run(params, stacked))
  return [{k: np.asarray(v[i]) for k, v in history.items()} for i in range(len(grads))]


def max_relative_difference(
    actual: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]
) -> float:
  """max over steps and leaves of |a - e|_inf / max(|e|_inf, 1e-30)."""
  worst = 0.0
  for a_step, e_step in zip(actual, expected, strict=True):
    for key in e_step:
      a = np.asarray(a_step[key], np.complex128)
      e = np.asarray(e_step[key], np.complex128)
      scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-30)
      worst = max(worst, float(np.max(np.abs(a - e), initial=0.0)) / scale)
  return worst


CONVENTIONS = ["pytorch", "keras", "optax", "paper"]


def scaled(convention: str, lr: float = 1e-2, **options) -> optax.GradientTransformation:
  """``scale_by_amsgrad`` followed by a plain ``-lr`` step."""
  return optax.chain(
      optax_amsgrad.scale_by_amsgrad(convention=convention, **options),
      optax.scale(-lr),
  )
