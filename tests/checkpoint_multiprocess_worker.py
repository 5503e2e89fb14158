"""One of two JAX processes that save and restore sharded AMSGrad state
together, run by tests/test_checkpoint.py.

``python tests/checkpoint_multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES
DIR``: joins the others through ``jax.distributed`` (coordinator on
127.0.0.1:PORT), shards params and state over one device per process, trains
with a ``checkpoint.Manager`` saving asynchronously into ``DIR/run``, then
restores a mid-run step with a new manager (as a restarted job would) and
trains on from it. It also replaces a checkpoint with
``checkpoint.save(..., force=True)`` and reads it back. Every process calls
every save and restore. Writes ``DIR/result_<PROCESS_ID>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax

# Before any computation: gloo carries the collectives between CPU processes.
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from etils import epath  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_amsgrad  # noqa: E402
from optax_amsgrad import checkpoint  # noqa: E402

STEPS, INTERVAL, RESUME_AT = 12, 4, 8
SHAPES = {"kernel": (8, 6), "bias": (6,)}


def optimizer() -> optax.GradientTransformation:
  return optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=optax.linear_schedule(1e-2, 1e-3, STEPS)
  )


def noise(t: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(100 + t)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def local(tree: Any) -> list[np.ndarray]:
  """This process's pieces of every leaf, in leaf order."""
  return [
      np.asarray(shard.data) for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
  ]


def same(a: Any, b: Any) -> bool:
  return all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(local(a), local(b), strict=True)
  )


def main() -> None:
  port, process_id, num_processes = map(int, sys.argv[1:4])
  out = Path(sys.argv[4])
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=60,
  )
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))
  shardings = {"kernel": NamedSharding(mesh, P("fsdp")), "bias": NamedSharding(mesh, P("fsdp"))}

  def sharded(tree: dict[str, np.ndarray]) -> Any:
    return {
        k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
        for k, v in tree.items()
    }

  @jax.jit
  def step(params: Any, state: Any, noise: Any) -> tuple[Any, Any]:
    # Elementwise: no sum whose order could depend on the layout.
    grads = jax.tree.map(lambda p, n: p + n, params, noise)
    updates, state = optimizer().update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  initial = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  params = sharded(initial)
  state = jax.jit(optimizer().init)(params)
  saved = {}
  # The three kinds of path: epath.Path, str and pathlib.Path.
  with checkpoint.Manager(
      epath.Path(out) / "run", save_interval_steps=INTERVAL, asynchronous=True
  ) as manager:
    for t in range(STEPS):
      params, state = step(params, state, sharded(noise(t)))
      if manager.save(t + 1, {"params": params, "opt_state": state}):
        saved[t + 1] = {"params": params, "opt_state": state}
  uninterrupted = {"params": params, "opt_state": state}

  template = sharded({k: np.zeros_like(v) for k, v in initial.items()})
  target = {"params": template, "opt_state": jax.jit(optimizer().init)(template)}
  with checkpoint.Manager(str(out / "run"), save_interval_steps=INTERVAL) as manager:
    steps = manager.all_steps()
    latest = manager.restore(None, target)
    restored = manager.restore(RESUME_AT, target)
  params, state = restored["params"], restored["opt_state"]
  for t in range(RESUME_AT, STEPS):
    params, state = step(params, state, sharded(noise(t)))
  resumed = {"params": params, "opt_state": state}

  checkpoint.save(out / "single", saved[INTERVAL])
  checkpoint.save(epath.Path(out) / "single", saved[RESUME_AT], force=True)
  replaced = checkpoint.restore(str(out / "single"), target)
  beside = sorted(p.name for p in out.iterdir() if p.name.startswith("single."))

  results = {
      "steps": steps,
      "latest_equals_last_saved": same(latest, saved[STEPS]),
      "restored_equals_saved": same(restored, saved[RESUME_AT]),
      "restored_sharded_as_target": all(
          a.sharding.is_equivalent_to(b.sharding, a.ndim)
          for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True)
      ),
      "resumed_equals_uninterrupted": same(resumed, uninterrupted),
      "replaced_equals_second_save": same(replaced, saved[RESUME_AT]),
      "nothing_beside_replaced": beside == [],
      "local_shape_of_kernel": list(restored["params"]["kernel"].addressable_shards[0].data.shape),
  }
  (out / f"result_{process_id}.json").write_text(json.dumps(results))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
