"""Checkpoints of 8-bit state (``mu_dtype="int8"``, ``nu_dtype="int8"``).

A run whose moments are 8-bit blocks (codes, block exponents, stochastic
rounding keyed by the step count) resumes bit for bit from a
``checkpoint.Manager``, also when its process is killed with SIGKILL at a
random moment; restoring into a target of another storage format names each
moment whose format differs.

This file is also the killed training loop:
``python tests/test_int8_checkpoint.py DIR STEPS INTERVAL sync|async`` trains
a small MLP with 8-bit state in a jitted step that donates params and state,
saves every INTERVAL steps to ``DIR/checkpoints``, resumes from the latest
one, prints ``step T`` after each step and writes every leaf of the final
params and state to ``DIR/final.npz``.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scale_out.launch import printed, run_or_kill

import optax_amsgrad
from optax_amsgrad import _blockwise, checkpoint

import checkpoint_kill_worker

# Two kernels in 8-bit blocks (one with a partial block), the biases and the
# last kernel too small for blocks: float32.
SIZES = (16, 256, 300, 4)


def optimizer() -> optax.GradientTransformation:
  return optax_amsgrad.amsgrad(
      optax.cosine_decay_schedule(1e-2, 40), mu_dtype="int8", nu_dtype="int8")


def initial_params() -> dict[str, np.ndarray]:
  return checkpoint_kill_worker.initial_params(SIZES)


def batch(t: int) -> tuple[np.ndarray, np.ndarray]:
  return checkpoint_kill_worker.batch(t, SIZES)


loss = checkpoint_kill_worker.loss


def donated_step(solver: optax.GradientTransformation) -> Any:
  def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
    grads = jax.grad(loss)(params, x, y)
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def flat(tree: Any) -> dict[str, np.ndarray]:
  """Every leaf (8-bit blocks as their codes and exponents) by path and dtype."""
  return {f"{jax.tree_util.keystr(path)} {np.asarray(leaf).dtype}": np.array(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train(out: Path, steps: int, interval: int, asynchronous: bool) -> None:
  solver = optimizer()
  step = donated_step(solver)
  with checkpoint.Manager(out / "checkpoints", max_to_keep=2, save_interval_steps=interval,
                          asynchronous=asynchronous) as manager:
    params = jax.tree.map(jnp.asarray, initial_params())
    state = solver.init(params)
    start = manager.latest_step() or 0
    if start:
      restored = manager.restore(start, {"params": params, "opt_state": state})
      params, state = restored["params"], restored["opt_state"]
    print(f"start {start}", flush=True)
    for t in range(start, steps):
      params, state = step(params, state, *batch(t))
      manager.save(t + 1, {"params": params, "opt_state": state})
      print(f"step {t + 1}", flush=True)
  np.savez(out / "final.tmp.npz", **flat({"params": params, "opt_state": state}))
  os.replace(out / "final.tmp.npz", out / "final.npz")


def assert_same_bits(actual: Any, expected: Any) -> None:
  a, b = flat(actual), flat(expected)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_state_is_in_blocks():
  params = jax.tree.map(jnp.asarray, initial_params())
  state = optimizer().init(params)[0]
  blocked = sorted(k for k, v in state.mu.items() if _blockwise.is_quantized(v))
  assert blocked == ["w0", "w1"], blocked


# --- In process -----------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_manager_resumes_an_int8_run_bit_identical(tmp_path, asynchronous):
  solver = optimizer()
  step = donated_step(solver)
  params = jax.tree.map(jnp.asarray, initial_params())
  state = solver.init(params)
  saved = {}
  with checkpoint.Manager(tmp_path, save_interval_steps=4, max_to_keep=2,
                          asynchronous=asynchronous) as manager:
    for t in range(12):
      params, state = step(params, state, *batch(t))
      if manager.save(t + 1, {"params": params, "opt_state": state}):
        saved[t + 1] = jax.tree.map(np.array, {"params": params, "opt_state": state})
    manager.wait_until_finished()
    assert manager.all_steps() == [8, 12]
  uninterrupted = {"params": params, "opt_state": state}

  fresh = jax.tree.map(jnp.asarray, initial_params())
  with checkpoint.Manager(tmp_path, save_interval_steps=4) as manager:
    restored = manager.restore(8, {"params": fresh, "opt_state": solver.init(fresh)})
  assert_same_bits(restored, saved[8])
  assert _blockwise.is_quantized(restored["opt_state"][0].nu_max["w1"])
  params, state = restored["params"], restored["opt_state"]
  for t in range(8, 12):
    params, state = step(params, state, *batch(t))
  assert_same_bits({"params": params, "opt_state": state}, uninterrupted)
  # The steps after the checkpoint changed the codes: not a vacuous match.
  assert not np.array_equal(saved[8]["opt_state"][0].mu["w1"].codes,
                            np.asarray(uninterrupted["opt_state"][0].mu["w1"].codes))


def storage_lines(error: pytest.ExceptionInfo) -> list[str]:
  return [line.strip() for line in str(error.value).splitlines()[1:-1]]


def test_restore_into_another_storage_format_names_each_moment(tmp_path):
  params = jax.tree.map(jnp.asarray, initial_params())
  int8 = optax_amsgrad.amsgrad(1e-2, mu_dtype="int8", nu_dtype="int8").init(params)
  plain = optax_amsgrad.amsgrad(1e-2).init(params)
  checkpoint.save(tmp_path / "int8", int8)
  checkpoint.save(tmp_path / "plain", plain)
  blocks = "8-bit blocks (int8 storage: uint8 codes (256, 300), int8 exponents (256, 2))"
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.restore(tmp_path / "int8", plain)
  lines = storage_lines(error)
  assert (f"[0].mu['w1']: {blocks} in the checkpoint, an array of float32 (256, 300) in "
          "the target") in lines
  assert len(lines) == 6, lines  # mu, nu and nu_max of w0 and w1, once each
  assert all(re.match(r"\[0\]\.(mu|nu|nu_max)\['w[01]'\]: 8-bit blocks", line) for line in lines)
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.restore(tmp_path / "plain", int8)
  lines = storage_lines(error)
  assert (f"[0].nu_max['w1']: an array of float32 (256, 300) in the checkpoint, {blocks} in "
          "the target") in lines
  assert len(lines) == 6, lines
  # Mixed: only mu is in blocks in the target; nu and nu_max match.
  mu_only = optax_amsgrad.amsgrad(1e-2, mu_dtype="int8").init(params)
  with checkpoint.Manager(tmp_path / "run") as manager:
    manager.save(1, {"opt_state": int8})
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
      manager.restore(1, {"opt_state": mu_only})
  lines = storage_lines(error)
  assert len(lines) == 4 and all("['opt_state'][0].nu" in line for line in lines), lines


# --- Killed with SIGKILL ------------------------------------------------------------

THIS = Path(__file__).resolve()
KILL_TRIALS = int(os.environ.get("CHECKPOINT_KILL_TRIALS", "4"))
KILL_STEPS, KILL_INTERVAL = 24, 4
WORKER_TIMEOUT_S = 180


def run_worker(args: list[str], log: Path, *, kill_after: str | None = None,
               delay: float = 0.0) -> bool:
  """Runs the training loop to its end, or SIGKILLs it ``delay`` seconds after
  it prints ``kill_after``. Returns whether it was killed running."""
  return run_or_kill(THIS, args, log, timeout=WORKER_TIMEOUT_S, kill_after=kill_after,
                     delay=delay)


def kill_and_resume(seed: int, directory: Path) -> dict[str, Any]:
  """A run killed once at a random step plus a random delay (in a step, a
  save, Orbax's renaming or deleting), restarted from the latest step."""
  rng = random.Random(seed)
  mode = "async" if seed % 2 else "sync"
  args = [str(directory), str(KILL_STEPS), str(KILL_INTERVAL), mode]
  at = rng.randint(KILL_INTERVAL, KILL_STEPS - 2 * KILL_INTERVAL)
  killed = run_worker(args, directory / "log_0.txt", kill_after=f"step {at}",
                      delay=rng.uniform(0.0, 0.05))
  assert killed, (directory / "log_0.txt").read_text()[-3000:]
  killed_after = max(printed(directory / "log_0.txt", "step"))
  assert not run_worker(args, directory / "log_1.txt")
  resumed_from = printed(directory / "log_1.txt", "start")[0]
  with np.load(directory / "final.npz") as final:
    return {"mode": mode, "killed_after": killed_after, "resumed_from": resumed_from,
            "final": dict(final)}


def test_killed_int8_training_resumes_bit_identical(tmp_path):
  directories = [tmp_path / f"trial_{seed}" for seed in range(KILL_TRIALS)]
  for directory in [tmp_path / "uninterrupted", *directories]:
    directory.mkdir()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(
        run_worker, [str(tmp_path / "uninterrupted"), str(KILL_STEPS), str(KILL_INTERVAL), "sync"],
        tmp_path / "uninterrupted" / "log.txt")
    trials = list(pool.map(kill_and_resume, range(KILL_TRIALS), directories))
    assert reference.result() is False
  with np.load(tmp_path / "uninterrupted" / "final.npz") as final:
    uninterrupted = dict(final)
  print(f"\n{len(trials)} int8 trials: killed after {[t['killed_after'] for t in trials]}, "
        f"resumed from {[t['resumed_from'] for t in trials]}, modes {[t['mode'] for t in trials]}")
  # Every trial resumed from a checkpoint (none lost), some from before the kill.
  for trial in trials:
    complete = trial["killed_after"] // KILL_INTERVAL * KILL_INTERVAL
    if trial["mode"] == "async":
      complete -= KILL_INTERVAL
    assert complete <= trial["resumed_from"] <= trial["killed_after"], trial
  assert any(t["resumed_from"] < t["killed_after"] for t in trials), trials
  assert any(name.endswith("codes uint8") for name in uninterrupted)
  for trial in trials:
    assert trial["final"].keys() == uninterrupted.keys()
    for name, expected in uninterrupted.items():
      assert trial["final"][name].dtype == expected.dtype, name
      np.testing.assert_array_equal(trial["final"][name], expected, err_msg=name)


if __name__ == "__main__":
  out, steps, interval, kind = sys.argv[1:]
  assert kind in ("sync", "async"), kind
  train(Path(out), int(steps), int(interval), kind == "async")
