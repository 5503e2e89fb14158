"""Step time, compile time and memory of one AMSGrad step, side by side.

Measures, in one process and interleaved, one optimizer step (update and
``apply_updates`` in one jitted function, params and state donated) of

* ``ours``: ``optax_amsgrad.amsgrad`` (state shaped like the params),
* ``ours_flat``: the same wrapped in ``optax_amsgrad.flatten_by_dtype``
  (state in one contiguous buffer per dtype),
* ``optax.amsgrad``, with and without donation, and ``optax.adam``,
* ``torch.optim.Adam(amsgrad=True)`` with ``fused=True`` and ``foreach=True``
  (on CUDA when torch sees a GPU),
* ``floor``: a jitted, donated ``a + s * b`` on as many float32 elements as
  the params hold: the machine's streaming bandwidth, measured in the same
  run. An AMSGrad step must move 36 bytes per float32 parameter (read g, p,
  m, v, v_max; write p, m, v, v_max), so ``36 * n / bandwidth`` is the
  fastest it can be: the "limit".

Every round runs a block of steps of each variant in a shuffled order; the
first step of a block is dropped (it pays for the switch: caches, waking
thread pools). Times are medians over all the kept steps. JAX and torch use
the same number of CPU threads (all the cores this process may run on).

It also measures the first-call cost (trace, lower, compile) of the 500-leaf
style step against the number of leaves, and for every JAX variant reads
from the compiled step the temporaries (``memory_analysis``), the bytes
accessed per parameter (XLA's ``cost_analysis``) and the number of fusions.

Run::

  python benchmarks/step_time.py            # the figures (~5 min on 2 cores)
  python benchmarks/step_time.py --quick    # small sizes, < 1 min: a smoke test

It prints tables, writes ``benchmarks/results/step_time.json`` (or
``step_time_quick.json``) and, when matplotlib is installed, a plot next to
it. It runs unchanged on a GPU (JAX's default device, torch on CUDA) and
prints which device it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Leave room for torch on a GPU: JAX would otherwise take 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine import CORE_PACKAGES, command_line, cpu_threads, load_average, provenance

import optax_amsgrad
from optax_amsgrad import flatten_by_dtype

try:
  import torch
except ImportError:  # pragma: no cover - torch is an optional extra
  torch = None

ROOT = Path(__file__).resolve().parent
LEARNING_RATE = 1e-3
# Bytes an optimizer step must move per float32 parameter.
MIN_BYTES = {"amsgrad": 36, "adam": 28}

FULL_CASES = [
    ("1e6 x 1", [1_000_000]),
    ("1e7 x 1", [10_000_000]),
    ("3e7 x 1", [30_000_000]),
    ("500 x 2,000", [2_000] * 500),
    ("50 x 200,000", [200_000] * 50),
]
QUICK_CASES = [
    ("1e5 x 1", [100_000]),
    ("20 x 2,000", [2_000] * 20),
]
FULL_COMPILE_LEAVES = [1, 10, 100, 500]
QUICK_COMPILE_LEAVES = [1, 10, 50]
COMPILE_LEAF_SIZE = 2_000

# name -> (optimizer factory, donate, kind of step for the byte count, how
# the step is taken: "update" (solver.update, then optax.apply_updates) or
# "apply_step" (optax_amsgrad.apply_step))
JAX_VARIANTS: dict[
    str, tuple[Callable[[], optax.GradientTransformation], bool, str, str]
] = {
    "ours": (lambda: optax_amsgrad.amsgrad(LEARNING_RATE), True, "amsgrad", "update"),
    "ours.apply_step": (
        lambda: optax_amsgrad.amsgrad(LEARNING_RATE), True, "amsgrad", "apply_step"
    ),
    "ours_flat": (
        lambda: flatten_by_dtype(optax_amsgrad.amsgrad(LEARNING_RATE)), True, "amsgrad",
        "update",
    ),
    "ours_flat.apply_step": (
        lambda: flatten_by_dtype(optax_amsgrad.amsgrad(LEARNING_RATE)), True, "amsgrad",
        "apply_step",
    ),
    "optax.amsgrad": (lambda: optax.amsgrad(LEARNING_RATE), True, "amsgrad", "update"),
    "optax.amsgrad_no_donation": (
        lambda: optax.amsgrad(LEARNING_RATE), False, "amsgrad", "update"
    ),
    "optax.adam": (lambda: optax.adam(LEARNING_RATE), True, "adam", "update"),
}
TORCH_VARIANTS = {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}}
COMPILE_VARIANTS = [
    "ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step", "optax.amsgrad"
]


def torch_device() -> str | None:
  if torch is None:
    return None
  return "cuda" if torch.cuda.is_available() else "cpu"


def make_params(leaf_sizes: list[int], value: float = 0.5) -> dict[str, jax.Array]:
  return {
      f"w{i:04d}": jnp.full((size,), value, jnp.float32)
      for i, size in enumerate(leaf_sizes)
  }


def make_grads(leaf_sizes: list[int], seed: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(seed), len(leaf_sizes))
  return {
      f"w{i:04d}": 1e-2 * jax.random.normal(key, (size,), jnp.float32)
      for i, (key, size) in enumerate(zip(keys, leaf_sizes, strict=True))
  }


def tree_bytes(tree: Any) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def step_function(opt: optax.GradientTransformation, call: str) -> Callable[..., Any]:
  if call == "apply_step":
    return lambda params, state, grads: optax_amsgrad.apply_step(opt, grads, state, params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def count_fusions(hlo_text: str) -> int:
  """Kernels of the compiled step: XLA fusions and calls of the CPU handlers."""
  entry = hlo_text.split("\nENTRY", 1)[-1]
  return sum(1 for line in entry.splitlines()
             if " fusion(" in line or " custom-call(" in line)


def analyse(compiled: Any, n_params: int) -> dict[str, Any]:
  """Deterministic figures of a compiled step."""
  out: dict[str, Any] = {}
  memory = compiled.memory_analysis()
  if memory is not None:
    out["temp_bytes"] = int(memory.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if cost and "bytes accessed" in cost:
    out["bytes_accessed_per_param"] = float(cost["bytes accessed"]) / n_params
  out["fusions"] = count_fusions(compiled.as_text())
  return out


class JaxVariant:
  """A jitted step of an Optax optimizer, with its own params and state."""

  def __init__(self, name: str, leaf_sizes: list[int], grads: dict[str, jax.Array]):
    factory, donate, self.kind, call = JAX_VARIANTS[name]
    self.name = name
    opt = factory()
    params = make_params(leaf_sizes)
    state = opt.init(params)
    self.grads = grads
    self.n_params = sum(leaf_sizes)
    self.state_bytes = tree_bytes(state)
    jitted = jax.jit(step_function(opt, call), donate_argnums=(0, 1) if donate else ())
    start = time.perf_counter()
    compiled = jitted.trace(params, state, grads).lower().compile()
    self.info = {
        "donated": donate,
        "compile_s": time.perf_counter() - start,
        "state_bytes": self.state_bytes,
        **analyse(compiled, self.n_params),
    }
    if "temp_bytes" in self.info:
      self.info["temp_fraction_of_state"] = self.info["temp_bytes"] / max(
          self.state_bytes, 1
      )
    self.jitted = jitted
    self.carry = [params, state]

  def run(self) -> None:
    params, state = self.jitted(self.carry[0], self.carry[1], self.grads)
    self.carry = [params, state]
    # All outputs of one execution become ready together.
    jax.block_until_ready(jax.tree.leaves(params)[0])


class TorchVariant:
  def __init__(self, name: str, leaf_sizes: list[int], grads: dict[str, jax.Array]):
    self.name = name
    self.kind = "amsgrad"
    device = torch_device()
    self.cuda = device == "cuda"
    self.params = []
    for size, g in zip(leaf_sizes, grads.values(), strict=True):
      p = torch.full((size,), 0.5, dtype=torch.float32, device=device, requires_grad=True)
      p.grad = torch.from_numpy(np.array(g)).to(device)
      self.params.append(p)
    self.opt = torch.optim.Adam(
        self.params, lr=LEARNING_RATE, amsgrad=True, **TORCH_VARIANTS[name]
    )
    self.info: dict[str, Any] = {"device": device, **TORCH_VARIANTS[name]}

  def run(self) -> None:
    self.opt.step()
    if self.cuda:
      torch.cuda.synchronize()


class FloorVariant:
  """A donated, jitted ``a + s * b``: 12 bytes per element."""

  kind = "floor"

  def __init__(self, n: int):
    self.name = "floor"
    self.n = n
    self.b = 1e-2 * jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    self.fn = jax.jit(lambda a, b: a + 0.5 * b, donate_argnums=0)
    self.a = jnp.ones((n,), jnp.float32)
    self.info: dict[str, Any] = {"bytes_per_element": 12}

  def run(self) -> None:
    self.a = self.fn(self.a, self.b)
    jax.block_until_ready(self.a)


def measure(variants: list[Any], rounds: int, steps: int, seed: int) -> dict[str, list[float]]:
  """Per-step seconds of every variant, interleaved in shuffled blocks."""
  rng = random.Random(seed)
  times: dict[str, list[float]] = {v.name: [] for v in variants}
  for v in variants:  # warm-up: compilation, first-touch of buffers
    for _ in range(2):
      v.run()
  for _ in range(rounds):
    order = list(variants)
    rng.shuffle(order)
    for v in order:
      for k in range(steps + 1):
        start = time.perf_counter()
        v.run()
        elapsed = time.perf_counter() - start
        if k:  # the first step of a block pays for the switch
          times[v.name].append(elapsed)
  return times


def summarise(samples: list[float]) -> dict[str, float]:
  q1, median, q3 = np.percentile(samples, [25, 50, 75])
  return {
      "median_ms": 1e3 * float(median),
      "q1_ms": 1e3 * float(q1),
      "q3_ms": 1e3 * float(q3),
      "samples": len(samples),
  }


def run_case(
    name: str, leaf_sizes: list[int], args: argparse.Namespace
) -> dict[str, Any]:
  n = sum(leaf_sizes)
  grads = make_grads(leaf_sizes, args.seed)
  variants: list[Any] = [FloorVariant(n)]
  for variant in JAX_VARIANTS:
    variants.append(JaxVariant(variant, leaf_sizes, grads))
  if torch is not None and not args.no_torch:
    for variant in TORCH_VARIANTS:
      variants.append(TorchVariant(variant, leaf_sizes, grads))
  times = measure(variants, args.rounds, args.steps, args.seed)

  floor_s = statistics.median(times["floor"])
  bandwidth = 12 * n / floor_s
  results: dict[str, Any] = {}
  for v in variants:
    entry = {**summarise(times[v.name]), **v.info}
    median_s = entry["median_ms"] / 1e3
    if v.kind in MIN_BYTES:
      limit_s = MIN_BYTES[v.kind] * n / bandwidth
      entry["min_bytes_per_param"] = MIN_BYTES[v.kind]
      entry["achieved_GBps"] = MIN_BYTES[v.kind] * n / median_s / 1e9
      entry["fraction_of_limit"] = limit_s / median_s
    results[v.name] = entry
  for reference in ("optax.amsgrad", "torch_fused"):
    if reference not in results:
      continue
    base = results[reference]["median_ms"]
    for entry in results.values():
      entry[f"ratio_vs_{reference}"] = entry["median_ms"] / base
  return {
      "name": name,
      "leaves": len(leaf_sizes),
      "leaf_size": leaf_sizes[0],
      "params": n,
      "bandwidth_GBps": bandwidth / 1e9,
      "limit_ms": 1e3 * MIN_BYTES["amsgrad"] * n / bandwidth,
      "variants": results,
  }


def compile_sweep(leaves_list: list[int], leaf_size: int) -> list[dict[str, Any]]:
  """First-call cost of the step against the number of leaves."""
  rows = []
  for leaves in leaves_list:
    sizes = [leaf_size] * leaves
    grads = make_grads(sizes, 0)
    for variant in COMPILE_VARIANTS:
      jax.clear_caches()
      factory, donate, _, call = JAX_VARIANTS[variant]
      opt = factory()
      params = make_params(sizes)
      state = opt.init(params)
      jitted = jax.jit(step_function(opt, call), donate_argnums=(0, 1) if donate else ())
      t0 = time.perf_counter()
      traced = jitted.trace(params, state, grads)
      t1 = time.perf_counter()
      lowered = traced.lower()
      t2 = time.perf_counter()
      compiled = lowered.compile()
      t3 = time.perf_counter()
      rows.append({
          "variant": variant,
          "leaves": leaves,
          "leaf_size": leaf_size,
          "trace_s": t1 - t0,
          "lower_s": t2 - t1,
          "compile_s": t3 - t2,
          "total_s": t3 - t0,
          "fusions": count_fusions(compiled.as_text()),
      })
      print(
          f"  compile {variant:14s} {leaves:4d} leaves: trace {t1 - t0:6.2f} s, "
          f"lower {t2 - t1:6.2f} s, compile {t3 - t2:6.2f} s, total {t3 - t0:6.2f} s",
          flush=True,
      )
  return rows


def environment(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
  """The common provenance, with the run's settings and the devices and
  threads of JAX and torch."""
  device = jax.devices()[0]
  packages = CORE_PACKAGES if args.no_torch else (*CORE_PACKAGES, "torch")
  meta = provenance(command_line("step_time.py", argv), packages=packages, quick=args.quick)
  meta.update({
      "rounds": args.rounds,
      "steps_per_block": args.steps,
      "jax_platform": device.platform,
      "jax_device": str(device.device_kind),
      "torch_device": None if args.no_torch else torch_device(),
      "torch_threads": None if torch is None else torch.get_num_threads(),
  })
  if torch is not None and torch_device() == "cuda":
    meta["torch_cuda_device"] = torch.cuda.get_device_name()
  return meta


def fmt(x: float | None, spec: str = ".2f") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_tables(report: dict[str, Any]) -> None:
  names = ["ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step", "optax.amsgrad",
           "optax.amsgrad_no_donation", "optax.adam", "torch_fused", "torch_foreach"]
  limit_names = ("ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step",
                 "optax.amsgrad", "torch_fused")
  print("\nStep time relative to optax.amsgrad (jit, donated); medians:")
  print("| params | " + " | ".join(names) + " | fraction of the limit, "
        + " / ".join(limit_names) + " |")
  print("|---" * (len(names) + 2) + "|")
  for case in report["cases"]:
    v = case["variants"]
    ratios = [fmt(v[k]["ratio_vs_optax.amsgrad"]) if k in v else "-" for k in names]
    fractions = " / ".join(
        fmt(v[k]["fraction_of_limit"]) if k in v else "-"
        for k in limit_names
    )
    print(f"| {case['name']} | " + " | ".join(ratios) + f" | {fractions} |")

  print("\nMedian step time, ms (interquartile range in brackets):")
  print("| params | floor (a + s*b) | limit | " + " | ".join(names) + " |")
  print("|---" * (len(names) + 3) + "|")
  for case in report["cases"]:
    v = case["variants"]
    cells = [
        f"{v[k]['median_ms']:.3f} [{v[k]['q1_ms']:.3f}, {v[k]['q3_ms']:.3f}]"
        if k in v else "-" for k in names
    ]
    print(f"| {case['name']} | {v['floor']['median_ms']:.3f} "
          f"({case['bandwidth_GBps']:.1f} GB/s) | {case['limit_ms']:.3f} | "
          + " | ".join(cells) + " |")

  if any("torch_fused" in c["variants"] for c in report["cases"]):
    print("\nRatio to torch fused (< 1: faster than torch):")
    torch_names = ("ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step",
                   "optax.amsgrad")
    print("| params | " + " | ".join(torch_names) + " |")
    print("|---" * (len(torch_names) + 1) + "|")
    for case in report["cases"]:
      v = case["variants"]
      print(f"| {case['name']} | " + " | ".join(
          fmt(v[k].get("ratio_vs_torch_fused")) for k in torch_names
      ) + " |")

  jax_names = list(JAX_VARIANTS)
  print("\nCompiled step: kernels (XLA fusions and handler calls) / bytes accessed per "
        "param (XLA cost model; a handler call counts as 0) / "
        "temporaries as a fraction of the state:")
  print("| params | " + " | ".join(jax_names) + " |")
  print("|---" * (len(jax_names) + 1) + "|")
  for case in report["cases"]:
    v = case["variants"]
    cells = [
        f"{v[k].get('fusions', '-')} / {fmt(v[k].get('bytes_accessed_per_param'), '.1f')}"
        f" / {fmt(v[k].get('temp_fraction_of_state'), '.2%')}"
        for k in jax_names
    ]
    print(f"| {case['name']} | " + " | ".join(cells) + " |")

  if report["compile"]:
    print("\nFirst call (trace + lower + compile), seconds, leaves of "
          f"{report['compile'][0]['leaf_size']:,} params:")
    leaves = sorted({row["leaves"] for row in report["compile"]})
    print("| leaves | " + " | ".join(COMPILE_VARIANTS) + " |")
    print("|---" * (len(COMPILE_VARIANTS) + 1) + "|")
    for count in leaves:
      cells = []
      for variant in COMPILE_VARIANTS:
        row = next(r for r in report["compile"]
                   if r["leaves"] == count and r["variant"] == variant)
        cells.append(f"{row['total_s']:.2f}")
      print(f"| {count} | " + " | ".join(cells) + " |")


def plot(report: dict[str, Any], path: Path) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  names = ["ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step", "optax.amsgrad",
           "optax.adam", "torch_fused", "torch_foreach"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
  cases = report["cases"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [c["variants"].get(name, {}).get("fraction_of_limit", np.nan) for c in cases]
    ax1.bar(np.arange(len(cases)) + i * width, values, width, label=name)
  ax1.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
  ax1.set_xticklabels([c["name"] for c in cases], rotation=15)
  ax1.set_ylabel("fraction of the bandwidth limit (higher is faster)")
  ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
  ax1.legend(fontsize=8)
  ax1.set_title(f"AMSGrad step on {report['meta']['jax_device']}")
  for variant in COMPILE_VARIANTS:
    rows = [r for r in report["compile"] if r["variant"] == variant]
    ax2.plot([r["leaves"] for r in rows], [r["total_s"] for r in rows], "o-", label=variant)
  ax2.set_xscale("log")
  ax2.set_yscale("log")
  ax2.set_xlabel("leaves")
  ax2.set_ylabel("first call: trace + lower + compile (s)")
  ax2.legend(fontsize=8)
  ax2.set_title("compile time")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few steps (a smoke test, not the figures)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="interleaved rounds (default 12, quick 3)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per block, after one dropped step (default 5, quick 2)")
  parser.add_argument("--out", type=Path, default=None, help="JSON output path")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--no-compile-sweep", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.rounds is None:
    args.rounds = 3 if args.quick else 12
  if args.steps is None:
    args.steps = 2 if args.quick else 5
  if args.out is None:
    args.out = ROOT / "results" / ("step_time_quick.json" if args.quick else "step_time.json")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  threads = cpu_threads()
  if torch is not None:
    # XLA's CPU client runs one thread per core this process may use; torch
    # gets the same number.
    torch.set_num_threads(threads)
  report: dict[str, Any] = {"meta": environment(args, argv), "cases": [], "compile": []}
  meta = report["meta"]
  print(f"JAX on {meta['jax_platform']} ({meta['jax_device']}), CPU {meta['machine']['cpu']}, "
        f"{threads} threads for XLA and torch; torch {meta['versions'].get('torch')} on "
        f"{meta['torch_device']}", flush=True)
  for name, sizes in QUICK_CASES if args.quick else FULL_CASES:
    print(f"case {name} ...", flush=True)
    report["cases"].append(run_case(name, sizes, args))
  if not args.no_compile_sweep:
    print("compile time against the number of leaves ...", flush=True)
    report["compile"] = compile_sweep(
        QUICK_COMPILE_LEAVES if args.quick else FULL_COMPILE_LEAVES, COMPILE_LEAF_SIZE
    )
  meta["machine"]["load_average_end"] = load_average()
  print_tables(report)
  print(f"\nload average (1, 5, 15 min) at the start {meta['machine']['load_average_start']}, "
        f"at the end {meta['machine']['load_average_end']}")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"\nwrote {args.out}")
  if not args.no_plot and plot(report, args.out.with_suffix(".png")):
    print(f"wrote {args.out.with_suffix('.png')}")
  return report


if __name__ == "__main__":
  main()
