"""Checkpointing fully sharded AMSGrad state on eight host devices, run by
tests/test_checkpoint.py.

``python tests/scale_out/checkpoint_sharded.py OUT_DIR``: trains params and
state split across 8 devices, saves them mid-training with
``optax_amsgrad.checkpoint``, and resumes twice: onto the same layout and onto
another one (a 2x4 mesh). Writes ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_amsgrad
from optax_amsgrad import checkpoint

STEPS, SAVE_AT = 12, 4
SHAPES = {"kernel": (64, 32), "bias": (128,), "stacked": (2, 16, 24)}


def layouts() -> dict[str, dict[str, NamedSharding]]:
  fsdp = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  grid = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  return {
      "fsdp": {
          "kernel": NamedSharding(fsdp, P("fsdp")),
          "bias": NamedSharding(fsdp, P("fsdp")),
          "stacked": NamedSharding(fsdp, P(None, "fsdp")),
      },
      "grid": {
          "kernel": NamedSharding(grid, P("b", "a")),
          "bias": NamedSharding(grid, P()),
          "stacked": NamedSharding(grid, P("a", None, "b")),
      },
  }


def optimizer() -> optax.GradientTransformation:
  return optax.inject_hyperparams(optax_amsgrad.amsgrad)(
      learning_rate=optax.linear_schedule(1e-2, 1e-3, STEPS)
  )


def noise(t: int) -> dict[str, np.ndarray]:
  """Gaussian gradient noise with rare large spikes, fixed per step."""
  rng = np.random.default_rng(100 + t)
  return {
      k: (rng.normal(size=s) * np.where(rng.random(s) < 0.05, 50.0, 1.0)).astype(
          np.float32
      )
      for k, s in SHAPES.items()
  }


@jax.jit
def step(params: Any, state: Any, noise: Any) -> tuple[Any, Any]:
  # The gradient of a noisy quadratic: elementwise, with no sum whose order
  # could depend on the layout, so that runs on different layouts can agree
  # bit for bit.
  grads = jax.tree.map(lambda p, n: p + n, params, noise)
  updates, state = optimizer().update(grads, state, params)
  return optax.apply_updates(params, updates), state


def run(params: Any, state: Any, start: int, stop: int) -> tuple[Any, Any]:
  shardings = jax.tree.map(lambda p: p.sharding, params)
  for t in range(start, stop):
    params, state = step(params, state, jax.device_put(noise(t), shardings))
  return params, state


def same_bits(a: Any, b: Any) -> bool:
  return all(
      np.array_equal(np.asarray(x), np.asarray(y))
      and np.asarray(x).dtype == np.asarray(y).dtype
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def max_ulps(a: Any, b: Any) -> int:
  """Largest distance, in float32 units in the last place, between leaves."""
  worst = 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.float32:
      assert np.array_equal(x, y)
      continue
    # Map floats to integers that are consecutive along the real line.
    ix, iy = (v.view(np.int32).astype(np.int64) for v in (x, y))
    ix = np.where(ix < 0, -(2**31) - ix, ix)
    iy = np.where(iy < 0, -(2**31) - iy, iy)
    worst = max(worst, int(np.max(np.abs(ix - iy), initial=0)))
  return worst


def sharded_as(tree: Any, shardings: dict[str, NamedSharding]) -> bool:
  """Every leaf of ``tree`` shaped like a param has that param's sharding."""
  ok = True
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = getattr(path[-1], "key", None)
    if name in shardings:
      ok &= leaf.sharding.is_equivalent_to(shardings[name], leaf.ndim)
  return ok


def main() -> None:
  out = Path(sys.argv[1])
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  initial = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  shardings = layouts()

  params = jax.device_put(initial, shardings["fsdp"])
  state = optimizer().init(params)
  params, state = run(params, state, 0, SAVE_AT)
  checkpoint.save(out / "checkpoint", {"params": params, "opt_state": state})
  uninterrupted = run(params, state, SAVE_AT, STEPS)

  results: dict[str, Any] = {"state_sharded_at_save": sharded_as(state, shardings["fsdp"])}
  for name, layout in shardings.items():
    # A target with the layout to resume on: fresh params and their state,
    # initialised eagerly (the count is not committed to any device) or under
    # jit (the count is replicated over the mesh).
    template = jax.device_put(jax.tree.map(np.zeros_like, initial), layout)
    init = optimizer().init if name == "fsdp" else jax.jit(optimizer().init)
    target = {"params": template, "opt_state": init(template)}
    restored = checkpoint.restore(out / "checkpoint", target)
    resumed = run(restored["params"], restored["opt_state"], SAVE_AT, STEPS)
    results[name] = {
        "restored_sharded_as_target": sharded_as(restored, layout),
        "restored_equals_saved": same_bits(
            restored, {"params": params, "opt_state": state}
        ),
        "resumed_equals_uninterrupted": same_bits(resumed, uninterrupted),
        "resumed_max_ulps_from_uninterrupted": max_ulps(resumed, uninterrupted),
        "resumed_elements_differing": sum(
            int(np.sum(np.asarray(x) != np.asarray(y)))
            for x, y in zip(
                jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True
            )
        ),
        "elements": sum(np.size(x) for x in jax.tree.leaves(resumed)),
        "resumed_sharded_as_target": sharded_as(resumed, layout),
    }
  (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
