"""One of several JAX processes training the example model data-parallel.

``python tests/scale_out/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES
STEPS OUT_DIR``: joins the others through ``jax.distributed`` (coordinator on
127.0.0.1:PORT, process 0 hosts it), feeds its own slice of every global batch,
and writes its final params to ``OUT_DIR/params_<PROCESS_ID>.npz``. Run by
tests/test_multiprocess.py, which compares the processes with each other and
with a single-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

# Before any computation: gloo carries the collectives between CPU processes.
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from launch import load_example  # noqa: E402

import optax_amsgrad  # noqa: E402


def main() -> None:
  port, process_id, num_processes, steps = map(int, sys.argv[1:5])
  out = Path(sys.argv[5])
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=60,
  )
  assert jax.process_count() == num_processes
  assert jax.device_count() == num_processes * jax.local_device_count()

  example = load_example("data_parallel")
  inputs, targets, params = example.make_data()
  mesh = jax.make_mesh(
      (jax.device_count(),), ("data",), axis_types=(AxisType.Auto,)
  )
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))

  # Every process holds the same initial params; each global array is
  # assembled from the processes' local pieces.
  params = jax.make_array_from_process_local_data(replicated, params)
  optimizer = optax_amsgrad.amsgrad(example.LEARNING_RATE)
  state = jax.jit(optimizer.init)(params)

  def train_step(params, state, x, y):
    grads = jax.grad(example.loss_fn)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
      train_step,
      in_shardings=(replicated, None, batch, batch),
      out_shardings=(replicated, None),
      donate_argnums=(0, 1),
  )
  # This process's rows of every global batch: a contiguous block, the order
  # in which the batch sharding lays processes' devices out.
  rows = inputs.shape[1] // num_processes
  mine = slice(process_id * rows, (process_id + 1) * rows)
  for t in range(steps):
    x = jax.make_array_from_process_local_data(batch, inputs[t, mine])
    y = jax.make_array_from_process_local_data(batch, targets[t, mine])
    params, state = step(params, state, x, y)
    jax.block_until_ready(params)

  local = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
  np.savez(out / f"params_{process_id}.npz", **local)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
