"""Step time of a training loop that saves with ``checkpoint.Manager``.

A jitted step of an MLP with about 1e6 float32 params (forward, backward and
``amsgrad``, params and state donated) runs in three variants: without saving
(``no_save``), with a ``Manager`` saving params and state synchronously every
``--interval`` steps (``sync``) and asynchronously (``async``). Every round
runs a block of ``--interval`` steps of each variant, in a rotating order.
Each block saves on its first step; an asynchronous block ends by waiting for
that save to finish, so that its background writing is charged to it and not
to the next variant. That wait is what a real loop would pay at its next
save, which waits for the previous one. The loop calls ``manager.save(step,
...)`` on every step, as a training loop would (it saves on the interval
only), and blocks until each step's params are ready.

Reported per variant: the mean step time over all steps (what the run pays),
its ratio to ``no_save``'s, the cost per step and per save in ms, and the
median time of a step that saves and of one that does not.

  python benchmarks/checkpoint_cost.py            # 1e6 params, interval 100, ~1 minute
  python benchmarks/checkpoint_cost.py --quick    # a small model: a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine import CORE_PACKAGES, command_line, load_average, provenance

import optax_amsgrad
from optax_amsgrad import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def make_problem(widths: list[int], batch: int) -> tuple[dict[str, Any], Any, Any]:
  rng = np.random.default_rng(0)
  params = {}
  for i, (m, n) in enumerate(itertools.pairwise(widths)):
    params[f"w{i}"] = jnp.asarray((rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32))
    params[f"b{i}"] = jnp.zeros((n,), jnp.float32)
  x = jnp.asarray(rng.normal(size=(batch, widths[0])).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(batch, widths[-1])).astype(np.float32))
  return params, x, y


def loss(params: dict[str, Any], x: Any, y: Any) -> Any:
  layers = len(params) // 2
  for i in range(layers):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < layers - 1:
      x = jax.nn.relu(x)
  return jnp.mean((x - y) ** 2)


class Run:
  """One variant's params, state and manager, stepped block by block."""

  def __init__(self, name: str, widths: list[int], batch: int, interval: int, root: Path):
    self.name = name
    self.optimizer = optax_amsgrad.amsgrad(1e-3)
    self.params, self.x, self.y = make_problem(widths, batch)
    self.state = self.optimizer.init(self.params)

    def step(params: Any, state: Any, x: Any, y: Any) -> tuple[Any, Any]:
      grads = jax.grad(loss)(params, x, y)
      updates, state = self.optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.manager = None
    if name != "no_save":
      self.manager = checkpoint.Manager(
          root / name, max_to_keep=2, save_interval_steps=interval,
          asynchronous=name == "async",
      )
    # Each block's first step is a multiple of the interval: it saves.
    self.t = interval - 1
    self.saving_ms: list[float] = []
    self.other_ms: list[float] = []
    self.total_s = 0.0
    self.steps = 0
    self.saves = 0

  def block(self, length: int) -> None:
    start = time.perf_counter()
    for _ in range(length):
      begin = time.perf_counter()
      self.params, self.state = self.step(self.params, self.state, self.x, self.y)
      self.t += 1
      saved = False
      if self.manager is not None:
        saved = self.manager.save(self.t, {"params": self.params, "opt_state": self.state})
      jax.block_until_ready(self.params)
      elapsed = 1e3 * (time.perf_counter() - begin)
      (self.saving_ms if saved else self.other_ms).append(elapsed)
      self.saves += saved
    if self.manager is not None:
      self.manager.wait_until_finished()
    self.total_s += time.perf_counter() - start
    self.steps += length


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--interval", type=int, default=100, help="steps between saves")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 512, 16])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--quick", action="store_true",
                      help="a small model, interval 5, 2 rounds: a smoke test")
  parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint_cost.json")
  args = parser.parse_args(argv)
  if args.quick:
    args.interval, args.rounds, args.widths, args.batch = 5, 2, [16, 32, 4], 8

  meta = provenance(command_line("checkpoint_cost.py", argv),
                    packages=(*CORE_PACKAGES, "orbax-checkpoint"), quick=args.quick)
  variants = ["no_save", "sync", "async"]
  with tempfile.TemporaryDirectory() as root:
    runs = [Run(name, args.widths, args.batch, args.interval, Path(root)) for name in variants]
    params = sum(int(np.size(p)) for p in jax.tree.leaves(runs[0].params))
    for run in runs:  # compiles, and a first save of each manager
      run.block(args.interval)
      run.saving_ms, run.other_ms, run.total_s, run.steps, run.saves = [], [], 0.0, 0, 0
    for r in range(args.rounds):
      for k in range(len(runs)):
        runs[(r + k) % len(runs)].block(args.interval)
    for run in runs:
      if run.manager is not None:
        run.manager.close()

  base_ms = 1e3 * runs[0].total_s / runs[0].steps
  results: dict[str, Any] = {}
  for run in runs:
    mean_ms = 1e3 * run.total_s / run.steps
    entry: dict[str, Any] = {
        "steps": run.steps,
        "saves": run.saves,
        "mean_step_ms": mean_ms,
        "ratio_vs_no_save": mean_ms / base_ms,
        "cost_per_step_ms": mean_ms - base_ms,
        "median_step_without_save_ms": float(np.median(run.other_ms)),
    }
    if run.saves:
      entry["cost_per_save_ms"] = (mean_ms - base_ms) * run.steps / run.saves
      entry["median_saving_step_ms"] = float(np.median(run.saving_ms))
    results[run.name] = entry

  state_bytes = sum(
      int(np.size(leaf)) * np.dtype(leaf.dtype).itemsize
      for leaf in jax.tree.leaves((runs[0].params, runs[0].state))
  )
  meta["machine"]["device"] = str(jax.devices()[0])
  meta["machine"]["load_average_end"] = load_average()
  report = {
      "meta": meta,
      "config": {
          "params": params,
          "widths": args.widths,
          "batch": args.batch,
          "saved_bytes": state_bytes,
          "interval": args.interval,
          "rounds": args.rounds,
      },
      "variants": results,
  }
  print(f"{params:.3g} params, {state_bytes / 1e6:.1f} MB saved every {args.interval} steps, "
        f"{args.rounds} rounds")
  print("| variant | mean step ms | vs no_save | cost per save ms | median saving step ms |")
  print("|---|---|---|---|---|")
  for name, entry in results.items():
    per_save = entry.get("cost_per_save_ms")
    saving = entry.get("median_saving_step_ms")
    print(f"| {name} | {entry['mean_step_ms']:.2f} | {entry['ratio_vs_no_save']:.3f} | "
          f"{'' if per_save is None else f'{per_save:.0f}'} | "
          f"{'' if saving is None else f'{saving:.0f}'} |")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=1))
  print("wrote", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
