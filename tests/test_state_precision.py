"""bfloat16 optimizer state keeps the float32 trajectory; a plain cast does not.

A fast version of ``benchmarks/state_precision.py``: final loss at a fixed
step budget with float32 state, with bfloat16 state stored by stochastic
rounding (the default) and with a plain bfloat16 cast, on problems still
converging at the budget, several seeds each (vmapped: one compilation per
variant). Everything is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_amsgrad

SEEDS = 6
BF16 = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}
VARIANTS = {
    "float32": {},
    "stochastic": {**BF16, "state_rounding": "stochastic"},
    "cast": {**BF16, "state_rounding": "nearest"},
}


def _least_squares_data(seed: int, n: int = 256, d: int = 64):
  """Full-batch least squares with condition number 100."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(n, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a = (u * np.logspace(1, -1, d)) @ v.T
  b = a @ rng.normal(size=d) + 0.01 * rng.normal(size=n)
  return a.astype(np.float32), b.astype(np.float32)


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = jnp.tanh(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


def _noisy_mlp_data(seed: int, n: int = 512, width: int = 32, batch: int = 32,
                    steps: int = 2000):
  """Regression of sin(2 x0) cos(x1) with label noise 0.1; fixed minibatches."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2, 2, size=(n, 2))
  y = np.sin(2 * x[:, :1]) * np.cos(x[:, 1:]) + 0.1 * rng.normal(size=(n, 1))
  params = {
      "w1": rng.normal(size=(2, width)) / np.sqrt(2), "b1": np.zeros(width),
      "w2": rng.normal(size=(width, width)) / np.sqrt(width), "b2": np.zeros(width),
      "w3": rng.normal(size=(width, 1)) / np.sqrt(width), "b3": np.zeros(1),
  }
  batches = rng.integers(0, n, size=(steps, batch))
  as32 = lambda t: jax.tree.map(lambda z: np.asarray(z, np.float32), t)
  return as32(x), as32(y), as32(params), batches.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("variant", "steps", "learning_rate"))
def _least_squares_final_loss(a, b, *, variant, steps, learning_rate):
  optimizer = optax_amsgrad.amsgrad(learning_rate, **VARIANTS[variant])

  def one(a, b):
    loss = lambda x: jnp.mean((a @ x - b) ** 2)

    def step(carry, _):
      x, state = carry
      updates, state = optimizer.update(jax.grad(loss)(x), state, x)
      return (optax.apply_updates(x, updates), state), None

    x = jnp.zeros(a.shape[1], jnp.float32)
    (x, _), _ = jax.lax.scan(step, (x, optimizer.init(x)), None, length=steps)
    return loss(x)

  return jax.vmap(one)(a, b)


@functools.partial(jax.jit, static_argnames=("variant", "learning_rate"))
def _mlp_final_loss(x, y, params, batches, *, variant, learning_rate):
  optimizer = optax_amsgrad.amsgrad(learning_rate, **VARIANTS[variant])

  def one(x, y, params, batches):
    loss = lambda p, xb, yb: jnp.mean((_mlp(p, xb) - yb) ** 2)

    def step(carry, index):
      params, state = carry
      grads = jax.grad(loss)(params, x[index], y[index])
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    carry = (params, optimizer.init(params))
    (params, _), _ = jax.lax.scan(step, carry, batches)
    return loss(params, x, y)

  return jax.vmap(one)(x, y, params, batches)


def _relative_changes(final_losses: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  base = final_losses["float32"]
  return {k: np.asarray(v) / base - 1 for k, v in final_losses.items() if k != "float32"}


@pytest.fixture(scope="module")
def least_squares():
  data = [_least_squares_data(seed) for seed in range(SEEDS)]
  a = np.stack([d[0] for d in data])
  b = np.stack([d[1] for d in data])
  losses = {
      variant: np.asarray(_least_squares_final_loss(
          a, b, variant=variant, steps=2000, learning_rate=1e-2))
      for variant in VARIANTS
  }
  return losses


@pytest.fixture(scope="module")
def noisy_mlp():
  data = [_noisy_mlp_data(seed) for seed in range(SEEDS)]
  stacked = [jax.tree.map(lambda *z: np.stack(z), *[d[k] for d in data])
             for k in range(4)]
  return {
      variant: np.asarray(_mlp_final_loss(*stacked, variant=variant,
                                          learning_rate=3e-3))
      for variant in VARIANTS
  }


def test_least_squares_is_still_converging_at_the_budget():
  # The comparison means something only if the loss is still falling: a
  # converged problem would hide any drift. Twice the budget still halves it.
  a, b = _least_squares_data(0)
  at_budget, at_double = (
      float(_least_squares_final_loss(a[None], b[None], variant="float32",
                                      steps=steps, learning_rate=1e-2)[0])
      for steps in (2000, 4000)
  )
  assert at_double < 0.5 * at_budget


def test_least_squares_stochastic_bfloat16_within_one_percent(least_squares):
  changes = _relative_changes(least_squares)
  assert np.all(np.abs(changes["stochastic"]) < 0.01), changes


def test_least_squares_plain_cast_drifts_more(least_squares):
  # With b2 = 0.999 the cast throws away nu's increments: the drift is
  # several times the stochastic rounding's, on every seed.
  changes = _relative_changes(least_squares)
  assert np.all(np.abs(changes["cast"]) > np.abs(changes["stochastic"])), changes
  assert np.mean(np.abs(changes["cast"])) > 3 * np.mean(np.abs(changes["stochastic"]))


def test_noisy_mlp_stochastic_bfloat16_within_one_percent(noisy_mlp):
  changes = _relative_changes(noisy_mlp)
  assert np.all(np.abs(changes["stochastic"]) < 0.01), changes


def test_noisy_mlp_plain_cast_drifts_more(noisy_mlp):
  changes = _relative_changes(noisy_mlp)
  assert np.max(np.abs(changes["cast"])) > 3 * np.max(np.abs(changes["stochastic"]))
  assert np.mean(np.abs(changes["cast"])) > 3 * np.mean(np.abs(changes["stochastic"]))


@functools.partial(jax.jit, static_argnames=("variant",))
def _two_layer_final_loss(x, y, params, *, variant):
  optimizer = optax_amsgrad.amsgrad(1e-4, **VARIANTS[variant])
  loss = lambda p: jnp.sum((jnp.maximum(x @ p["w1"], 0) @ p["w2"] - y) ** 2)

  def step(carry, _):
    params, state = carry
    updates, state = optimizer.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                length=500)
  return loss(params)


def test_two_layer_example():
  # The two-layer ReLU network of the PyTorch examples (N=64, D_in=1000,
  # H=100, D_out=10, summed squared error, lr 1e-4, 500 steps): the cast
  # ends about 6% off, stochastic rounding within 0.1%.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 1000)).astype(np.float32)
  y = rng.normal(size=(64, 10)).astype(np.float32)
  params = {"w1": rng.normal(size=(1000, 100)).astype(np.float32),
            "w2": rng.normal(size=(100, 10)).astype(np.float32)}
  losses = {v: float(_two_layer_final_loss(x, y, params, variant=v))
            for v in VARIANTS}
  changes = _relative_changes(losses)
  assert abs(changes["stochastic"]) < 0.01, changes
  assert abs(changes["cast"]) > 0.03, changes
