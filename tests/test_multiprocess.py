"""Two JAX processes joined by jax.distributed train data-parallel with AMSGrad.

Each process owns one CPU device and feeds half of every global batch; gloo
carries the gradient all-reduce between them. Both must end with the same
params, and those must be the single-process run's to float32 round-off.
"""

from __future__ import annotations

import os
import socket
import time

import jax.numpy as jnp
import numpy as np
import pytest
from scale_out.launch import load_example, run_together
from scale_out.training import relative_difference, train_single_device

STEPS = 30
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(port: int, process_id: int, out, steps: int | str = STEPS):
  return ("multiprocess_worker.py", [str(port), str(process_id), "2", str(steps), str(out)])


def is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  run_together([worker(port, 0, tmp_path), worker(port, 1, tmp_path)], timeout=TIMEOUT_S)
  first = dict(np.load(tmp_path / "params_0.npz"))
  second = dict(np.load(tmp_path / "params_1.npz"))

  # The same bits on both processes: one all-reduced gradient, one update.
  assert first.keys() == second.keys()
  for name in first:
    assert first[name].dtype == np.float32
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)

  # The single-process run differs only by the order of the gradient sum:
  # float32 round-off, grown over 30 steps to ~1e-5 (measured 8.6e-6).
  example = load_example("data_parallel")
  single = train_single_device(example, steps=STEPS, dtype=jnp.float32)
  assert relative_difference(first, single) <= 1e-4
  # Training moved the params: equality is not that of two untouched inits.
  _, _, initial = example.make_data()
  assert relative_difference(initial, single) > 1e-3


def test_failed_process_stops_the_other(tmp_path):
  # Process 1 fails at once (bad argument); process 0 would wait up to a minute
  # for it in jax.distributed.initialize. Both must be gone straight away.
  port = free_port()
  pids: list[int] = []
  start = time.monotonic()
  with pytest.raises(AssertionError, match="exited with"):
    run_together(
        [worker(port, 0, tmp_path), worker(port, 1, tmp_path, steps="many")],
        timeout=TIMEOUT_S,
        pids=pids,
    )
  assert time.monotonic() - start < 30
  assert len(pids) == 2 and not any(map(is_running, pids))


def test_timeout_kills_the_processes(tmp_path):
  # A lone process 0 waits for a peer that never comes.
  pids: list[int] = []
  with pytest.raises(AssertionError, match="still running after 3 s"):
    run_together([worker(free_port(), 0, tmp_path)], timeout=3, pids=pids)
  assert len(pids) == 1 and not is_running(pids[0])
