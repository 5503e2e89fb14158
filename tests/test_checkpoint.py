"""Saving AMSGrad's state mid-training with Orbax and resuming from it.

A resumed run must be bit-identical to the uninterrupted one, for plain,
narrow-storage, inject_hyperparams, flat and sharded state, saved with
``checkpoint.save`` or a ``checkpoint.Manager`` (also in a job of two
processes); a checkpoint that does not fit the target must fail with an error
naming each mismatch, and a path or step without a checkpoint with one saying
what is there. Training and saving loops killed with SIGKILL at random moments
must never lose the last complete checkpoint, and a killed run resumed from
the manager's latest step must end bit-identical to one never killed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scale_out.launch import printed, run_or_kill, run_script, run_together

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
    # One flat buffer per dtype instead of a tree shaped like the params.
    "flatten_by_dtype": lambda: optax_amsgrad.flatten_by_dtype(
        optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16)
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


# --- Manager ----------------------------------------------------------------


def donated_step(optimizer):
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


# Half of the optimizers are saved asynchronously, half synchronously.
ASYNCHRONOUS = {"bfloat16_state", "flatten_by_dtype", "amsgrad"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_manager_resumed_run_is_bit_identical(tmp_path, name):
  # A jitted step that donates params and state, as in a real training loop.
  optimizer = OPTIMIZERS[name]()
  asynchronous = name in ASYNCHRONOUS
  initial, x, y = make_problem()
  step = donated_step(optimizer)
  params = jax.tree.map(jnp.asarray, initial)
  state = optimizer.init(params)
  saved = {}
  with checkpoint.Manager(
      tmp_path, save_interval_steps=4, max_to_keep=2, asynchronous=asynchronous
  ) as manager:
    for t in range(STEPS):
      params, state = step(params, state, x[t], y[t])
      if manager.save(t + 1, {"params": params, "opt_state": state}):
        # Copies: the next step donates params and state.
        saved[t + 1] = jax.tree.map(np.array, {"params": params, "opt_state": state})
    assert sorted(saved) == [4, 8, 12, 16, 20]
    # An asynchronous save counts once it is complete.
    manager.wait_until_finished()
    assert manager.all_steps() == [16, 20]
  uninterrupted = (params, state)

  # A restarted process: a new manager, a fresh target, the latest step.
  fresh = jax.tree.map(jnp.asarray, initial)
  target = {"params": fresh, "opt_state": optimizer.init(fresh)}
  with checkpoint.Manager(tmp_path, save_interval_steps=4) as manager:
    assert manager.latest_step() == 20
    assert_same_bits(manager.restore(manager.latest_step(), target), saved[20])
    restored = manager.restore(16, target)
  assert_same_bits(restored, saved[16])
  resumed = train(optimizer, restored["params"], restored["opt_state"], x, y, 16, STEPS)
  assert_same_bits(resumed, uninterrupted)
  assert not np.array_equal(uninterrupted[0]["w"], saved[16]["params"]["w"])



def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_manager_in_two_processes_with_sharded_state(tmp_path):
  # Every process saves and restores its shards of params and state split
  # over one device per process; both take the same steps.
  port = free_port()
  worker = "../checkpoint_multiprocess_worker.py"
  run_together(
      [(worker, [str(port), str(i), "2", str(tmp_path)]) for i in range(2)], timeout=180
  )
  for i in range(2):
    report = json.loads((tmp_path / f"result_{i}.json").read_text())
    assert report["steps"] == [4, 8, 12]
    assert report["local_shape_of_kernel"] == [4, 6]  # half of (8, 6): sharded
    for check in (
        "latest_equals_last_saved",
        "restored_equals_saved",
        "restored_sharded_as_target",
        "resumed_equals_uninterrupted",
        "replaced_equals_second_save",
        "nothing_beside_replaced",
    ):
      assert report[check] is True, (i, check)


def test_manager_saves_on_the_interval_only(tmp_path):
  tree = {"w": jnp.ones((3,), jnp.float32)}
  with checkpoint.Manager(tmp_path, save_interval_steps=5, max_to_keep=None) as manager:
    assert manager.latest_step() is None
    saved = [t for t in range(1, 13) if manager.save(t, tree)]
    assert saved == [5, 10]
    # Off the interval on request (the last step of a run), but never over a
    # step already saved nor before the latest.
    assert manager.save(12, tree, force=False) is False
    assert manager.save(12, tree, force=True) is True
    assert manager.save(12, tree, force=True) is False
    assert manager.save(11, tree) is False
    assert manager.all_steps() == [5, 10, 12]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["10", "12", "5"]


def test_manager_rejects_bad_options(tmp_path):
  with pytest.raises(ValueError, match="save_interval_steps"):
    checkpoint.Manager(tmp_path, save_interval_steps=0)
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Manager(tmp_path, max_to_keep=0)


def test_manager_restore_of_a_missing_step_names_the_steps_there_are(tmp_path):
  tree = {"w": jnp.ones((3,), jnp.float32)}
  with checkpoint.Manager(tmp_path / "run", save_interval_steps=2) as manager:
    with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
      manager.restore(None, tree)
    assert str(error.value) == f"No checkpoint in {tmp_path / 'run'}: it holds no checkpoint."
    for t in range(1, 7):
      manager.save(t, tree)
    with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
      manager.restore(3, tree)
  assert str(error.value) == (
      f"No checkpoint of step 3 in {tmp_path / 'run'}: it holds checkpoints of steps [2, 4, 6]."
  )
  assert isinstance(error.value, FileNotFoundError)


def test_manager_restore_checks_the_target(tmp_path):
  params = {"w": jnp.ones((5, 3), jnp.float32)}
  with checkpoint.Manager(tmp_path) as manager:
    manager.save(1, optax_amsgrad.amsgrad(1e-2).init(params))
    narrow = optax_amsgrad.amsgrad(1e-2, mu_dtype=jnp.bfloat16).init(params)
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
      manager.restore(1, narrow)
  message = str(error.value)
  assert message.startswith(f"The checkpoint of step 1 in {tmp_path} does not match")
  assert "[0].mu['w']: dtype float32 in the checkpoint, bfloat16 in the target" in message


def test_manager_removes_interrupted_saves_of_an_earlier_run(tmp_path):
  tree = {"w": jnp.ones((3,), jnp.float32)}
  with checkpoint.Manager(tmp_path) as manager:
    manager.save(1, tree)
  # What a process killed while writing step 2 leaves.
  (tmp_path / "2.orbax-checkpoint-tmp").mkdir()
  with checkpoint.Manager(tmp_path) as manager:
    assert manager.latest_step() == 1
    assert manager.save(2, tree)
    assert manager.all_steps() == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


# --- save(force=True) and what restore finds ----------------------------------


def counted(i: int) -> dict[str, jax.Array]:
  return {"count": jnp.asarray(i, jnp.int32), "x": jnp.full((64, 64), i, jnp.float32)}


def restored_count(path) -> int:
  restored = checkpoint.restore(path, counted(-1))
  assert np.all(np.asarray(restored["x"]) == int(restored["count"]))
  return int(restored["count"])


def siblings(path) -> list[str]:
  return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


def test_force_replaces_a_checkpoint_and_leaves_nothing_beside_it(tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save(path, counted(1))
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(path, counted(2))
  checkpoint.save(path, counted(2), force=True)
  assert restored_count(path) == 2
  assert siblings(path) == []


def test_restore_reads_the_new_checkpoint_when_a_swap_was_stopped(tmp_path):
  # save(force=True) killed after the old checkpoint was renamed away and
  # before the new one, complete, was renamed into place.
  path = tmp_path / "ckpt"
  checkpoint.save(path, counted(1))
  checkpoint.save(tmp_path / "ckpt.orbax-amsgrad-new", counted(2))
  path.rename(tmp_path / "ckpt.orbax-amsgrad-old")
  assert restored_count(path) == 2
  # The next save finishes the swap, removes the old one, then saves.
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(path, counted(3))
  assert restored_count(path) == 2
  assert siblings(path) == []
  checkpoint.save(path, counted(3), force=True)
  assert restored_count(path) == 3


def test_restore_reads_the_old_checkpoint_until_the_swap_starts(tmp_path):
  # Killed once the new checkpoint was complete, before either rename, or
  # while the new one was still being written: the old one is the checkpoint.
  path = tmp_path / "ckpt"
  checkpoint.save(path, counted(1))
  checkpoint.save(tmp_path / "ckpt.orbax-amsgrad-new", counted(2))
  (tmp_path / "ckpt.orbax-amsgrad-new.orbax-checkpoint-tmp").mkdir()
  assert restored_count(path) == 1
  checkpoint.save(path, counted(3), force=True)
  assert restored_count(path) == 3
  assert siblings(path) == []



def test_a_replaced_checkpoint_left_alone_is_kept(tmp_path):
  # Not a state a kill leaves (the new checkpoint is in place before the old
  # one is deleted), but if the path was removed by hand, save does not
  # delete the only checkpoint left.
  path = tmp_path / "ckpt"
  checkpoint.save(path, counted(1))
  path.rename(tmp_path / "ckpt.orbax-amsgrad-old")
  assert not_found_message(path).endswith(
      f"nothing but a replaced checkpoint being deleted (ckpt.orbax-amsgrad-old in {tmp_path})."
  )
  checkpoint.save(path, counted(2))
  assert siblings(path) == ["ckpt.orbax-amsgrad-old"]
  assert restored_count(path) == 2

def not_found_message(path, target=None) -> str:
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.restore(path, counted(0) if target is None else target)
  assert isinstance(error.value, FileNotFoundError)
  return str(error.value)


def test_restore_from_nothing_names_the_path(tmp_path):
  assert not_found_message(tmp_path / "ckpt") == f"No checkpoint at {tmp_path / 'ckpt'}: nothing."
  assert not_found_message(tmp_path / "no" / "ckpt") == (
      f"No checkpoint at {tmp_path / 'no' / 'ckpt'}: nothing: {tmp_path / 'no'} does not exist."
  )


def test_restore_from_an_interrupted_first_save_says_so(tmp_path):
  # What Orbax leaves when the process writing the first checkpoint is killed.
  (tmp_path / "ckpt.orbax-checkpoint-tmp").mkdir()
  (tmp_path / "ckpt.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").write_text("{}")
  message = not_found_message(tmp_path / "ckpt")
  assert message.startswith(
      f"No checkpoint at {tmp_path / 'ckpt'}: nothing but an interrupted save "
      f"(ckpt.orbax-checkpoint-tmp in {tmp_path})"
  )


def test_restore_from_a_directory_without_a_checkpoint_says_what_is_there(tmp_path):
  (tmp_path / "empty").mkdir()
  assert not_found_message(tmp_path / "empty").endswith(": an empty directory.")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("")
  assert not_found_message(tmp_path / "other").endswith(
      "a directory without an Orbax checkpoint in it (it holds notes.txt)."
  )
  with checkpoint.Manager(tmp_path / "run") as manager:
    manager.save(7, counted(7))
  assert not_found_message(tmp_path / "run").endswith(
      f"the directory of a Manager, with checkpoints of steps [7]; read them with "
      f"Manager('{tmp_path / 'run'}').restore(step, target)."
  )


def test_restore_of_another_tree_names_the_path(tmp_path):
  checkpoint.save(tmp_path / "ckpt", counted(1))
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.restore(tmp_path / "ckpt", {"w": jnp.zeros((3,), jnp.float32)})
  assert str(error.value).startswith(f"The checkpoint at {tmp_path / 'ckpt'} does not match")


# --- Killed with SIGKILL ------------------------------------------------------
#
# The loops run in tests/checkpoint_kill_worker.py, in processes of their own,
# killed at a random step plus a random delay: in a training step, in a save,
# in Orbax's renaming or in its deleting of old checkpoints. Two trials run at
# a time. CHECKPOINT_KILL_TRIALS sets how many (5 by default).

KILL_WORKER = Path(__file__).resolve().parent / "checkpoint_kill_worker.py"
KILL_TRIALS = int(os.environ.get("CHECKPOINT_KILL_TRIALS", "5"))
KILL_STEPS, KILL_INTERVAL = 24, 4
WORKER_TIMEOUT_S = 120


def run_worker(args, log: Path, *, kill_after: str | None = None, delay: float = 0.0) -> bool:
  """Runs the kill worker to its end, or SIGKILLs it ``delay`` seconds after
  it prints the line ``kill_after``. Returns whether it was killed running."""
  return run_or_kill(KILL_WORKER, args, log, timeout=WORKER_TIMEOUT_S,
                     kill_after=kill_after, delay=delay)


def kill_and_resume(seed: int, directory: Path) -> dict[str, Any]:
  """One trial: a training run killed once or twice at random moments, each
  time restarted from the manager's latest step, then run to its end."""
  rng = random.Random(seed)
  mode = "async" if seed % 2 else "sync"
  args = ["train", str(directory), str(KILL_STEPS), str(KILL_INTERVAL), mode]
  kills = 1 + rng.randrange(2)
  record: dict[str, Any] = {"mode": mode, "killed_after": [], "resumed_from": [], "lost": 0}
  must_have = 0  # the step of the latest checkpoint sure to be complete
  for run in range(kills + 1):
    log = directory / f"log_{run}.txt"
    last = max(record["killed_after"], default=0)
    if run < kills and last < KILL_STEPS - 2 * KILL_INTERVAL:
      at = rng.randint(last + 1, KILL_STEPS - 2 * KILL_INTERVAL)
      killed = run_worker(args, log, kill_after=f"step {at}", delay=rng.uniform(0.0, 0.05))
    else:
      killed = run_worker(args, log)
    start = printed(log, "start")[0]
    if run:
      record["resumed_from"].append(start)
      record["lost"] += start < must_have
    if not killed:
      break
    last_step = max(printed(log, "step"), default=start)
    record["killed_after"].append(last_step)
    # A synchronous save is complete when save() returns, before its step is
    # printed; an asynchronous one when the next save() returns.
    complete = last_step // KILL_INTERVAL * KILL_INTERVAL
    if mode == "async":
      complete -= KILL_INTERVAL
    must_have = max(start, complete)
  assert not killed, record
  with np.load(directory / "final.npz") as final:
    record["final"] = dict(final)
  return record


@pytest.fixture(scope="module")
def kill_trials(tmp_path_factory) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  root = tmp_path_factory.mktemp("kills")
  directories = [root / f"trial_{seed}" for seed in range(KILL_TRIALS)]
  for directory in [root / "uninterrupted", *directories]:
    directory.mkdir()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reference = pool.submit(
        run_worker,
        ["train", str(root / "uninterrupted"), str(KILL_STEPS), str(KILL_INTERVAL), "sync"],
        root / "uninterrupted" / "log.txt",
    )
    trials = list(pool.map(kill_and_resume, range(KILL_TRIALS), directories))
    assert reference.result() is False
  with np.load(root / "uninterrupted" / "final.npz") as final:
    return dict(final), trials


def test_killed_training_resumes_bit_identical(kill_trials):
  uninterrupted, trials = kill_trials
  kills = sum(len(trial["killed_after"]) for trial in trials)
  lost = sum(trial["lost"] for trial in trials)
  print(
      f"\n{len(trials)} trials, {kills} kills, {lost} checkpoints lost, "
      f"killed after steps {[t['killed_after'] for t in trials]}, "
      f"resumed from {[t['resumed_from'] for t in trials]}, "
      f"modes {[t['mode'] for t in trials]}"
  )
  assert all(trial["killed_after"] for trial in trials), trials
  assert lost == 0, trials
  # Some kills cost steps: the run resumed from before where it was killed.
  assert any(
      r < k for t in trials for r, k in zip(t["resumed_from"], t["killed_after"], strict=True)
  )
  for trial in trials:
    assert trial["final"].keys() == uninterrupted.keys()
    for name, expected in uninterrupted.items():
      assert trial["final"][name].dtype == expected.dtype, name
      np.testing.assert_array_equal(trial["final"][name], expected, err_msg=name)


def kill_while_replacing(seed: int, directory: Path) -> dict[str, Any]:
  """One trial: the save(force=True) loop killed at a random moment; what is
  at the path then, and what restore reads from it."""
  rng = random.Random(seed)
  path = directory / "ckpt"
  log = directory / "log.txt"
  at = rng.randint(1, 6)
  killed = run_worker(
      ["replace", str(path)], log, kill_after=f"saved {at}", delay=rng.uniform(0.0, 0.1)
  )
  assert killed, log.read_text()[-3000:]
  left = siblings(path) + ([path.name] if path.exists() else [])
  return {"last_saved": max(printed(log, "saved")), "left": left, "path": path}


def test_killed_force_save_never_loses_the_checkpoint(tmp_path):
  directories = [tmp_path / f"trial_{seed}" for seed in range(KILL_TRIALS)]
  for directory in directories:
    directory.mkdir()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    trials = list(pool.map(kill_while_replacing, range(KILL_TRIALS), directories))
  print(f"\n{len(trials)} kills; left at the path: {[t['left'] for t in trials]}")
  for trial in trials:
    # The last save that returned, or the one the kill interrupted if it was
    # complete: never an older one, never nothing.
    assert restored_count(trial["path"]) in (trial["last_saved"], trial["last_saved"] + 1), trial
    checkpoint.save(trial["path"], counted(100), force=True)
    assert restored_count(trial["path"]) == 100
    assert siblings(trial["path"]) == []
