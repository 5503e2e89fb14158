"""The CPU kernel's step with 8-bit state, side by side with float32 state.

In one process and interleaved (``step_time.py``'s shuffled blocks, the first
step of each block dropped, medians), one step on one leaf of ``--params``
float32 params, params and state donated, of

* ``float32.kernel``: ``optax_amsgrad.amsgrad`` with float32 state,
  ``apply_step`` on the CPU kernel (``implementation="cpu"``);
* ``int8.kernel``: the same with ``mu_dtype`` and ``nu_dtype`` ``"int8"``;
* ``int8.kernel.update``: that, through ``update`` and ``apply_updates``
  (the kernel stores the codes; XLA decodes them into the update, as for
  every leaf above ``cpu.KERNEL_UPDATE_SIZE`` elements);
* ``int8.xla``: 8-bit state on the XLA path (``implementation="xla"``, what
  GPUs and TPUs run), ``apply_step``;
* ``optax.amsgrad``: ``update`` and ``apply_updates``;
* ``floor``: a donated ``a + s * b`` over as many float32 elements, the
  machine's streaming bandwidth in the same run.

It records each step's temporaries (``memory_analysis``) and state bytes,
and the ratios of the medians to ``float32.kernel`` and ``optax.amsgrad``.

Run::

  python benchmarks/int8_kernel.py            # 1e7 params, ~1 min on 2 cores
  python benchmarks/int8_kernel.py --quick    # 1e6 params, a smoke test

It writes ``benchmarks/results/int8_kernel.json`` (or ``int8_kernel_quick.json``)
with the commit, the machine and the versions; ``benchmarks/render.py``
renders its table into the docs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from machine import CORE_PACKAGES, command_line, load_average, provenance
from step_time import (
  FloorVariant,
  analyse,
  make_grads,
  make_params,
  measure,
  step_function,
  summarise,
  tree_bytes,
)

import optax_amsgrad

ROOT = Path(__file__).resolve().parent
LEARNING_RATE = 1e-3
INT8 = {"mu_dtype": "int8", "nu_dtype": "int8"}

# name -> (optimizer factory, how the step is taken)
VARIANTS: dict[str, tuple[Callable[[], optax.GradientTransformation], str]] = {
    "float32.kernel": (
        lambda: optax_amsgrad.amsgrad(LEARNING_RATE, implementation="cpu"), "apply_step"),
    "int8.kernel": (
        lambda: optax_amsgrad.amsgrad(LEARNING_RATE, **INT8, implementation="cpu"),
        "apply_step"),
    "int8.kernel.update": (
        lambda: optax_amsgrad.amsgrad(LEARNING_RATE, **INT8, implementation="cpu"), "update"),
    "int8.xla": (
        lambda: optax_amsgrad.amsgrad(LEARNING_RATE, **INT8, implementation="xla"),
        "apply_step"),
    "optax.amsgrad": (lambda: optax.amsgrad(LEARNING_RATE), "update"),
}
BASELINES = ("float32.kernel", "optax.amsgrad")


class Variant:
  """A jitted, donated step of one variant, with its own params and state."""

  def __init__(self, name: str, n: int, grads: dict[str, jax.Array]):
    factory, call = VARIANTS[name]
    self.name = name
    opt = factory()
    params = make_params([n])
    state = opt.init(params)
    self.grads = grads
    self.jitted = jax.jit(step_function(opt, call), donate_argnums=(0, 1))
    compiled = self.jitted.trace(params, state, grads).lower().compile()
    text = compiled.as_text()
    self.info = {
        "call": call,
        "state_bytes_per_param": tree_bytes(state) / n,
        "on_kernel": "custom-call(" in text and "optax_amsgrad_" in text,
        **analyse(compiled, n),
    }
    self.carry = [params, state]

  def run(self) -> None:
    params, state = self.jitted(self.carry[0], self.carry[1], self.grads)
    self.carry = [params, state]
    jax.block_until_ready(jax.tree.leaves(params)[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="1e6 params, few steps")
  parser.add_argument("--params", type=float, default=None, help="default 1e7, quick 1e6")
  parser.add_argument("--rounds", type=int, default=None, help="default 12, quick 3")
  parser.add_argument("--steps", type=int, default=None, help="default 5, quick 2")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  n = int(args.params or (1e6 if args.quick else 1e7))
  rounds = args.rounds or (3 if args.quick else 12)
  steps = args.steps or (2 if args.quick else 5)
  out = args.out or ROOT / "results" / (
      "int8_kernel_quick.json" if args.quick else "int8_kernel.json")
  if not optax_amsgrad.cpu_kernel_available():
    raise SystemExit("the CPU kernel was not built: nothing to measure")

  meta = {**provenance(command_line("int8_kernel.py", argv), packages=CORE_PACKAGES,
                       quick=args.quick),
          "params": n, "rounds": rounds, "steps": steps}
  grads = make_grads([n], args.seed)
  variants: list[Any] = [FloorVariant(n), *(Variant(name, n, grads) for name in VARIANTS)]
  times = measure(variants, rounds, steps, args.seed)
  meta["machine"]["load_average_end"] = load_average()

  floor_s = statistics.median(times["floor"])
  results: dict[str, Any] = {"floor": {**summarise(times["floor"]),
                                       "bandwidth_gb_s": 12 * n / floor_s / 1e9}}
  for v in variants[1:]:
    entry = {**summarise(times[v.name]), **v.info}
    for base in BASELINES:
      entry[f"ratio_to_{base}"] = entry["median_ms"] / statistics.median(
          [1e3 * t for t in times[base]])
    if "temp_bytes" in entry:
      entry["temp_in_float32_copies"] = entry["temp_bytes"] / (4 * n)
    results[v.name] = entry
  report = {"meta": meta, "variants": results}

  print(f"{n:,} params; streaming bandwidth {results['floor']['bandwidth_gb_s']:.1f} GB/s")
  print("| variant | median ms | / float32.kernel | / optax.amsgrad | state B/param |")
  print("|---|---|---|---|---|")
  for name in VARIANTS:
    r = results[name]
    print(f"| {name} | {r['median_ms']:.2f} | {r['ratio_to_float32.kernel']:.2f}x | "
          f"{r['ratio_to_optax.amsgrad']:.2f}x | {r['state_bytes_per_param']:.2f} |")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
