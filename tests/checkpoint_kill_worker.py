"""Training and saving loops for tests/test_checkpoint.py to kill with SIGKILL.

``python tests/checkpoint_kill_worker.py train DIR STEPS INTERVAL sync|async``
trains a small MLP with AMSGrad (bfloat16 moments, stochastic rounding, a
learning-rate schedule) in a jitted step that donates params and state. A
``checkpoint.Manager`` in ``DIR/checkpoints`` saves every INTERVAL steps; the
run resumes from its ``latest_step()`` if there is one. After each step it
prints ``step T``; at the end it writes every leaf of the final params and
state to ``DIR/final.npz``.

``python tests/checkpoint_kill_worker.py replace PATH`` saves
``{"count": i, "x": a 64x64 array filled with i}`` to PATH with
``checkpoint.save(..., force=True)`` for i = 0, 1, 2, ... and prints
``saved I`` after each save returns, until it is killed.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_amsgrad
from optax_amsgrad import checkpoint

SIZES = (16, 64, 64, 4)


def initial_params(sizes: tuple[int, ...] = SIZES) -> dict[str, np.ndarray]:
  """An MLP's params, layer widths ``sizes``."""
  rng = np.random.default_rng(0)
  params = {}
  for i, (m, n) in enumerate(itertools.pairwise(sizes)):
    params[f"w{i}"] = (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32)
    params[f"b{i}"] = np.zeros((n,), np.float32)
  return params


def batch(t: int, sizes: tuple[int, ...] = SIZES) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1000 + t)
  x = rng.normal(size=(32, sizes[0])).astype(np.float32)
  y = np.sin(x[:, : sizes[-1]]).astype(np.float32)
  return x, y


def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  layers = len(params) // 2
  h = x
  for i in range(layers):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < layers - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def flat(tree: Any) -> dict[str, np.ndarray]:
  """Every leaf by its path and dtype; bfloat16 leaves as their bits (uint16),
  which NumPy files keep."""
  leaves = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    if array.dtype == jnp.bfloat16:
      array = array.view(np.uint16)
    leaves[f"{jax.tree_util.keystr(path)} {np.asarray(leaf).dtype}"] = array
  return leaves


def train(out: Path, steps: int, interval: int, asynchronous: bool) -> None:
  optimizer = optax_amsgrad.amsgrad(
      optax.cosine_decay_schedule(1e-2, steps), mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  )

  def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
    grads = jax.grad(loss)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  train_step = jax.jit(step, donate_argnums=(0, 1))
  with checkpoint.Manager(
      out / "checkpoints",
      max_to_keep=2,
      save_interval_steps=interval,
      asynchronous=asynchronous,
  ) as manager:
    params = jax.tree.map(jnp.asarray, initial_params())
    state = optimizer.init(params)
    start = manager.latest_step()
    if start is None:
      start = 0
    else:
      restored = manager.restore(start, {"params": params, "opt_state": state})
      params, state = restored["params"], restored["opt_state"]
    print(f"start {start}", flush=True)
    for t in range(start, steps):
      params, state = train_step(params, state, *batch(t))
      manager.save(t + 1, {"params": params, "opt_state": state})
      print(f"step {t + 1}", flush=True)
  final = flat({"params": params, "opt_state": state})
  np.savez(out / "final.tmp.npz", **final)
  os.replace(out / "final.tmp.npz", out / "final.npz")


def replace(path: Path) -> None:
  i = 0
  while True:
    tree = {"count": jnp.asarray(i, jnp.int32), "x": jnp.full((64, 64), i, jnp.float32)}
    checkpoint.save(path, tree, force=True)
    print(f"saved {i}", flush=True)
    i += 1


def main() -> None:
  mode, *args = sys.argv[1:]
  if mode == "train":
    out, steps, interval, kind = args
    assert kind in ("sync", "async"), kind
    train(Path(out), int(steps), int(interval), kind == "async")
  elif mode == "replace":
    replace(Path(args[0]))
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  main()
