"""Single-device training runs of the example model, for comparison with the
sharded and multi-process runs."""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_amsgrad


def train_single_device(
    example: ModuleType, *, steps: int, dtype: jnp.dtype
) -> dict[str, np.ndarray]:
  """``steps`` AMSGrad steps on ``example``'s model and data (the data-parallel
  example), on one device, with params and data in ``dtype``."""
  inputs, targets, params = example.make_data()
  optimizer = optax_amsgrad.amsgrad(example.LEARNING_RATE)

  @jax.jit
  def run(params, inputs, targets):
    def step(carry, batch):
      params, state = carry
      grads = jax.grad(example.loss_fn)(params, *batch)
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        step, (params, optimizer.init(params)), (inputs, targets)
    )
    return params

  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  final = run(cast(params), cast(inputs[:steps]), cast(targets[:steps]))
  return jax.tree.map(np.asarray, final)


def relative_difference(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> float:
  """max over leaves of ``max|actual - expected| / max|expected|``."""
  assert actual.keys() == expected.keys()
  return max(
      float(np.max(np.abs(actual[k].astype(np.float64) - expected[k])))
      / float(np.max(np.abs(expected[k])))
      for k in expected
  )
