"""8-bit state on eight host devices: where it lives, what the step
communicates, and that sharded and single-device steps agree bit for bit.

Run by tests/test_int8_state.py in a process of its own; writes a JSON report
to the folder given as the first argument.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_amsgrad
from optax_amsgrad import _blockwise

COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)")


def main(out: Path) -> None:
  mesh = jax.make_mesh((8,), ("x",))
  report: dict[str, object] = {"devices": len(jax.devices())}
  solver = optax_amsgrad.amsgradw(1e-2, weight_decay=1e-2, mu_dtype="int8", nu_dtype="int8")
  rng = np.random.default_rng(0)
  host = {"rows": rng.normal(size=(256, 512)).astype(np.float32),
          "cols": rng.normal(size=(64, 8 * 256)).astype(np.float32)}
  specs = {"rows": P("x", None), "cols": P(None, "x")}
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
  state = solver.init(params)
  placement = {}
  for field in ("mu", "nu", "nu_max"):
    for name in params:
      q = getattr(state[0], field)[name]
      placement[f"{field}/{name}"] = [
          str(q.codes.sharding.spec), str(q.exponents.sharding.spec),
          len(q.exponents.addressable_shards)]
  report["placement"] = placement

  def step(p, s, g):
    return optax_amsgrad.apply_step(solver, g, s, p)

  grads_host = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in host.items()}
                for _ in range(3)]
  # Lowered (and later run on one device) through functions of their own:
  # the jits of one function share a cache, and would count those as
  # compiles of the sharded loop.
  report["collectives"] = sorted(set(COLLECTIVE.findall(
      jax.jit(lambda *a: step(*a)).lower(params, state, params).compile().as_text())))
  sharded = jax.jit(step)
  p, s = params, state
  for g in grads_host:
    g = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in g.items()}
    p, s = sharded(p, s, g)
  report["compiles"] = sharded._cache_size()  # type: ignore[attr-defined]
  single = jax.jit(lambda *a: step(*a))
  p1 = {k: jax.device_put(v, jax.devices()[0]) for k, v in host.items()}
  s1 = solver.init(p1)
  for g in grads_host:
    p1, s1 = single(p1, s1, {k: jax.device_put(v, jax.devices()[0]) for k, v in g.items()})
  report["same_as_single_device"] = all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p1, s1)), strict=True))
  report["quantized"] = _blockwise.is_quantized(s[0].nu_max["cols"])
  (out / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main(Path(sys.argv[1]))
