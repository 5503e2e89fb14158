"""Saving AMSGrad's state mid-training with Orbax and resuming from it.

A resumed run must be bit-identical to the uninterrupted one, for plain,
narrow-storage, inject_hyperparams and sharded state; a checkpoint that does
not fit the target must fail with an error naming each mismatch.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scale_out.launch import run_script

import optax_amsgrad
from optax_amsgrad import checkpoint

STEPS, SAVE_AT = 20, 8


def make_problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Params and data of a small least-squares problem, float32."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(STEPS, 16, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(STEPS, 16, 3))).astype(
      np.float32
  )
  params = {"w": np.zeros((5, 3), np.float32), "b": np.zeros((3,), np.float32)}
  return params, x, y


def loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


OPTIMIZERS = {
    "amsgrad": lambda: optax_amsgrad.amsgrad(1e-2),
    # Stochastic rounding draws its bits from the step count: a resumed run
    # only matches if the count is restored too.
    "bfloat16_state": lambda: optax_amsgrad.amsgrad(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax_amsgrad.amsgrad)(
        learning_rate=optax.cosine_decay_schedule(1e-2, STEPS), b1=0.8
    ),
    "amsgradw_paper": lambda: optax_amsgrad.amsgradw(
        1e-2, b1=lambda t: 0.9 / jnp.sqrt(t + 1.0), convention="paper"
    ),
}


def train(optimizer, params, state, x, y, start, stop):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(start, stop):
    params, state = step(params, state, x[t], y[t])
  return params, state


def assert_same_bits(actual: Any, expected: Any) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(actual)[0],
      jax.tree.leaves(expected),
      strict=True,
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_run_is_bit_identical(tmp_path, name):
  optimizer = OPTIMIZERS[name]()
  initial, x, y = make_problem()
  params = jax.tree.map(jnp.asarray, initial)
  params, state = train(optimizer, params, optimizer.init(params), x, y, 0, SAVE_AT)
  checkpoint.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  uninterrupted = train(optimizer, params, state, x, y, SAVE_AT, STEPS)

  # A new process would rebuild the target from scratch: fresh params, init.
  fresh = jax.tree.map(jnp.asarray, initial)
  target = {"params": fresh, "opt_state": optimizer.init(fresh)}
  restored = checkpoint.restore(tmp_path / "ckpt", target)
  assert_same_bits(restored, {"params": params, "opt_state": state})
  resumed = train(
      optimizer, restored["params"], restored["opt_state"], x, y, SAVE_AT, STEPS
  )
  assert_same_bits(resumed, uninterrupted)
  # The steps after the checkpoint changed the params: not a vacuous match.
  assert not np.array_equal(uninterrupted[0]["w"], params["w"])


def test_sharded_state_resumes_bit_identical(tmp_path):
  run_script("checkpoint_sharded.py", [str(tmp_path)], host_devices=8, timeout=300)
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["state_sharded_at_save"]
  same = report["fsdp"]
  assert same["restored_sharded_as_target"] and same["resumed_sharded_as_target"]
  assert same["restored_equals_saved"]
  assert same["resumed_equals_uninterrupted"]
  # Read onto another mesh, the state is the saved one bit for bit; the steps
  # after it are compiled for other shard shapes and may round differently.
  other = report["grid"]
  assert other["restored_sharded_as_target"] and other["resumed_sharded_as_target"]
  assert other["restored_equals_saved"]
  assert other["resumed_max_ulps_from_uninterrupted"] <= 64


def save_plain_state(tmp_path) -> tuple[Any, str]:
  params = {"w": jnp.ones((5, 3), jnp.float32), "b": jnp.ones((3,), jnp.float32)}
  state = optax_amsgrad.amsgrad(1e-2).init(params)
  path = tmp_path / "ckpt"
  checkpoint.save(path, state)
  return params, str(path)


def mismatch_message(path, target) -> str:
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.restore(path, target)
  return str(error.value)


def test_extra_param_in_target_is_named(tmp_path):
  params, path = save_plain_state(tmp_path)
  bigger = {**params, "scale": jnp.ones((2,), jnp.float32)}
  message = mismatch_message(path, optax_amsgrad.amsgrad(1e-2).init(bigger))
  for moment in ("mu", "nu", "nu_max"):
    assert f"[0].{moment}['scale']: in the target, not in the checkpoint" in message
  assert "(3 differences)" in message


def test_param_missing_from_target_is_named(tmp_path):
  params, path = save_plain_state(tmp_path)
  smaller = {"w": params["w"]}
  message = mismatch_message(path, optax_amsgrad.amsgrad(1e-2).init(smaller))
  assert "0.mu.b: in the checkpoint, not in the target" in message


def test_dtype_mismatch_is_named(tmp_path):
  # Orbax alone would cast the float32 moments to bfloat16 without a word.
  params, path = save_plain_state(tmp_path)
  narrow = optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16).init(params)
  message = mismatch_message(path, narrow)
  assert "[0].mu['w']: dtype float32 in the checkpoint, bfloat16 in the target" in message
  assert "[0].mu['b']: dtype float32 in the checkpoint, bfloat16 in the target" in message
  assert "(2 differences)" in message  # nu and nu_max stay float32


def test_shape_mismatch_is_named(tmp_path):
  params, path = save_plain_state(tmp_path)
  wider = {**params, "w": jnp.ones((5, 4), jnp.float32)}
  message = mismatch_message(path, optax_amsgrad.amsgrad(1e-2).init(wider))
  assert "[0].nu_max['w']: shape (5, 3) in the checkpoint, (5, 4) in the target" in (
      message
  )


def test_other_optimizer_state_is_named(tmp_path):
  params, path = save_plain_state(tmp_path)
  injected = optax.inject_hyperparams(optax_amsgrad.amsgrad)(learning_rate=1e-2)
  message = mismatch_message(path, injected.init(params))
  assert ".hyperparams['learning_rate']: in the target, not in the checkpoint" in (
      message
  )
