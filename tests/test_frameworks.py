"""End-to-end training with the frameworks users train with: Flax NNX, Flax linen, Equinox.

Each test trains a tiny model on a synthetic float32 regression problem for a few dozen steps and
checks that the loss falls well below where it started, so an optimizer that does not move the
parameters (or moves them the wrong way) fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_amsgrad

pytestmark = pytest.mark.both_modes

LEARNING_RATE = 1e-2
STEPS = 60
# The final loss must be below this fraction of the initial loss.
MAX_LOSS_RATIO = 0.5

VARIANTS = {
    "amsgrad": lambda lr: optax_amsgrad.amsgrad(lr),
    "amsgradw": lambda lr: optax_amsgrad.amsgradw(lr, weight_decay=1e-2),
    "bfloat16_state": lambda lr: optax_amsgrad.amsgrad(
        lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
}

variants = pytest.mark.parametrize("variant", list(VARIANTS))


def _data(n: int = 128, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, d), dtype=np.float32)
  w = rng.standard_normal((d, 1), dtype=np.float32)
  y = (np.sin(x @ w) + 0.5 * x[:, :1] ** 2).astype(np.float32)
  return x, y


def _check_loss_falls(losses: list[float]) -> None:
  initial, final = losses[0], losses[-1]
  assert np.all(np.isfinite(losses)), losses
  assert final < MAX_LOSS_RATIO * initial, (initial, final)


# ------------------------------------------------------------------------------------ Flax NNX


@variants
def test_flax_nnx(variant):
  from flax import nnx

  class Model(nnx.Module):

    def __init__(self, rngs: nnx.Rngs):
      self.linear1 = nnx.Linear(8, 32, rngs=rngs)
      self.bn = nnx.BatchNorm(32, rngs=rngs)
      self.linear2 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
      return self.linear2(jax.nn.relu(self.bn(self.linear1(x))))

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = _data()
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, VARIANTS[variant](LEARNING_RATE), wrt=nnx.Param)

  # The optimizer state holds moments for the parameters only, never for the batch statistics.
  param_shapes = sorted(p.shape for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  moment_shapes = sorted(
      leaf.shape for leaf in jax.tree.leaves(nnx.state(optimizer.opt_state)) if leaf.ndim > 0
  )
  assert moment_shapes, "no per-parameter optimizer state"
  assert len(moment_shapes) % len(param_shapes) == 0
  assert moment_shapes == sorted(param_shapes * (len(moment_shapes) // len(param_shapes)))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(STEPS)]
  _check_loss_falls(losses)
  assert int(optimizer.step[...]) == STEPS

  # The running statistics moved, through the forward passes.
  stats_after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  assert not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_after), strict=True)
  )

  # An optimizer update leaves them exactly as the forward pass left them.
  _, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))
  stats_forward = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  params_forward = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  stats_update = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  params_update = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, stats_forward, stats_update)
  assert not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(params_forward), jax.tree.leaves(params_update), strict=True)
  )

  # Evaluation mode uses the running statistics and still fits.
  model.eval()
  assert float(loss_fn(model, x, y)) < MAX_LOSS_RATIO * losses[0]


# ----------------------------------------------------------------------------------- Flax linen


@variants
def test_flax_linen(variant):
  import flax.linen as nn
  from flax.training import train_state

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = jax.nn.relu(nn.Dense(32)(x))
      return nn.Dense(1)(x)

  x, y = _data()
  model = MLP()
  params = model.init(jax.random.key(0), x[:1])["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=VARIANTS[variant](LEARNING_RATE)
  )

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(STEPS):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
  _check_loss_falls(losses)
  assert int(state.step) == STEPS
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


# -------------------------------------------------------------------------------------- Equinox


@variants
def test_equinox(variant):
  eqx = pytest.importorskip("equinox")

  x, y = _data()
  model = eqx.nn.MLP(
      in_size=8, out_size=1, width_size=32, depth=1, key=jax.random.key(0), dtype=jnp.float32
  )
  optimizer = VARIANTS[variant](LEARNING_RATE)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_value_and_grad
  def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  @eqx.filter_jit
  def train_step(model, opt_state, x, y):
    loss, grads = loss_fn(model, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  losses = []
  for _ in range(STEPS):
    model, opt_state, loss = train_step(model, opt_state, x, y)
    losses.append(float(loss))
  _check_loss_falls(losses)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
