"""First call and compiles of a jitted train step; step time on the XLA path.

Two measurements, side by side with ``optax.amsgrad``:

* **First call.** A jitted train step over a dict of ``--leaves`` float32
  leaves of ``--leaf-size`` params (made with ``jnp.asarray``: uncommitted),
  params and state donated::

    grads = jax.grad(loss)(params)
    updates, state = solver.update(grads, state, params)
    params = optax.apply_updates(params, updates)

  or ``params, state = optax_amsgrad.apply_step(solver, grads, state, params)``
  (``.apply_step``), for ``optax.amsgrad``, ``optax_amsgrad.amsgrad`` with
  float32 state (``ours``), with bfloat16 state (``ours_bf16``:
  ``mu_dtype`` and ``nu_dtype`` bfloat16, stochastic rounding) and with 8-bit
  state (``ours_int8``, ``mu_dtype`` and ``nu_dtype`` ``"int8"``), each of ours
  on the XLA path (``/xla``: ``OPTAX_AMSGRAD_CPU_KERNEL=0``, what GPUs and TPUs
  compile) and with the CPU kernel (``/kernel``, the default). Every run is a
  fresh process with the environment set: it times the first call of the
  jitted step (wall time, until its outputs are ready), runs two more steps
  and reads how many executables the jitted step holds
  (``jitted._cache_size()``: 1 unless a step compiled again); then, after
  ``jax.clear_caches()``, it times ``jax.jit(step).trace(...)``, ``.lower()``
  and ``.compile()`` of a new jitted step. Each variant runs in ``--repeats``
  processes (one only if its first took longer than ``--slow-s``), the
  variants in a shuffled order in every repeat; the figures are medians.
* **Step time on the XLA path.** One leaf of ``--params`` float32 params, a
  jitted step (``update`` and ``apply_updates``, params and state donated) of
  ``optax.amsgrad``, ``ours`` and ``ours_bf16``, in one process with
  ``OPTAX_AMSGRAD_CPU_KERNEL=0``, interleaved as ``step_time.py`` does (shuffled
  blocks, the first step of each block dropped, medians), next to a jitted,
  donated ``a + s * b`` over as many elements: the machine's streaming
  bandwidth in the same run. Each step's temporaries (``memory_analysis``)
  are recorded in float32 copies of the params.
* **State bytes** (``--state-bytes``). On a transformer-like model of 5e6
  params (embedding, four layers, layer norms, biases, a head), each solver's
  state in bytes per param, from the ``nbytes`` of every state leaf (block
  scales and the leaves that keep float32 state included), and the
  temporaries of its compiled, donated train step.

``--solvers`` chooses the solvers (``optax.amsgrad`` always runs). The 8-bit
figures::

  python benchmarks/compile_time.py --solvers optax.amsgrad,ours_int8 \
      --leaf-size 8192 --calls update,apply_step --repeats 3 --rounds 3 --steps 2 \
      --state-bytes --out benchmarks/results/compile_time_int8.json

(leaves of 8,192 params: those of 2,000 are too small for 8-bit blocks).

Run::

  python benchmarks/compile_time.py            # the figures (~10 min on 2 cores)
  python benchmarks/compile_time.py --quick    # 20 leaves, 1 repeat, 1e6: a smoke test

It prints markdown tables and writes ``benchmarks/results/compile_time.json``
(or ``compile_time_quick.json``) with every raw measurement, the medians, the
ratios, the commit, the machine and the versions; ``benchmarks/render.py``
renders the tables into the READMEs from it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine import CORE_PACKAGES, command_line, load_average, provenance

import optax_amsgrad
from optax_amsgrad import _blockwise

ROOT = Path(__file__).resolve().parent
LEARNING_RATE = 1e-3
KERNEL_SWITCH = "OPTAX_AMSGRAD_CPU_KERNEL"
RESULT_MARK = "RESULT "
REFERENCE = "optax.amsgrad"

# solver -> optimizer factory
SOLVERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.amsgrad": lambda: optax.amsgrad(LEARNING_RATE),
    "ours": lambda: optax_amsgrad.amsgrad(LEARNING_RATE),
    "ours_bf16": lambda: optax_amsgrad.amsgrad(
        LEARNING_RATE, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    # 8-bit blocks for leaves of at least _blockwise.MIN_SIZE elements.
    "ours_int8": lambda: optax_amsgrad.amsgrad(
        LEARNING_RATE, mu_dtype="int8", nu_dtype="int8"
    ),
}
DEFAULT_SOLVERS = ("optax.amsgrad", "ours", "ours_bf16")


def first_call_variants() -> dict[str, dict[str, Any]]:
  """name -> solver, call ("update" or "apply_step") and kernel (on, off, None)."""
  variants: dict[str, dict[str, Any]] = {}
  for call in ("update", "apply_step"):
    suffix = "" if call == "update" else ".apply_step"
    variants[REFERENCE + suffix] = {"solver": REFERENCE, "call": call, "kernel": None}
    for solver in ("ours", "ours_bf16", "ours_int8"):
      for kernel, path in (("off", "xla"), ("on", "kernel")):
        variants[f"{solver}{suffix}/{path}"] = {
            "solver": solver, "call": call, "kernel": kernel
        }
  return variants


FIRST_CALL_VARIANTS = first_call_variants()
STEP_VARIANTS = [REFERENCE, "ours", "ours_bf16", "ours_int8"]

# A transformer-like model of about 5e6 params for the bytes of the state:
# name -> shape. The layer norms, biases and the head are small leaves.
MODEL_WIDTH, MODEL_LAYERS, MODEL_VOCAB, MODEL_CLASSES = 256, 4, 8192, 10


def model_shapes() -> dict[str, tuple[int, ...]]:
  d = MODEL_WIDTH
  shapes: dict[str, tuple[int, ...]] = {"embedding": (MODEL_VOCAB, d)}
  for i in range(MODEL_LAYERS):
    shapes.update({
        f"layer{i}/qkv": (d, 3 * d), f"layer{i}/qkv_bias": (3 * d,),
        f"layer{i}/out": (d, d), f"layer{i}/out_bias": (d,),
        f"layer{i}/mlp_in": (d, 4 * d), f"layer{i}/mlp_in_bias": (4 * d,),
        f"layer{i}/mlp_out": (4 * d, d), f"layer{i}/mlp_out_bias": (d,),
        f"layer{i}/norm1": (d,), f"layer{i}/norm2": (d,),
    })
  shapes.update({"final_norm": (d,), "head": (d, MODEL_CLASSES), "head_bias": (MODEL_CLASSES,)})
  return shapes


# --------------------------------------------------------------------------
# Worker processes.


def loss(params: dict[str, jax.Array]) -> jax.Array:
  return 0.5 * sum(jnp.sum(p * p) for p in params.values())


def train_step(solver: optax.GradientTransformation, call: str) -> Callable[..., Any]:
  if call == "apply_step":

    def step(params, state):
      grads = jax.grad(loss)(params)
      return optax_amsgrad.apply_step(solver, grads, state, params)

  else:

    def step(params, state):
      grads = jax.grad(loss)(params)
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

  return step


def uncommitted_params(leaves: int, leaf_size: int, seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {
      f"w{i:04d}": jnp.asarray(rng.normal(size=leaf_size).astype(np.float32))
      for i in range(leaves)
  }


def state_dtypes(state: Any) -> list[str]:
  return sorted({
      str(leaf.dtype) for leaf in jax.tree.leaves(state) if np.ndim(leaf) > 0
  })


def first_call_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """One process: the first call and the compiles, then trace, lower, compile."""
  solver = SOLVERS[spec["solver"]]()
  # JAX's own start-up (the CPU client, the first dispatch) is no part of the step.
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(3)))

  params = uncommitted_params(spec["leaves"], spec["leaf_size"], spec["seed"])
  state = solver.init(params)
  jax.block_until_ready((params, state))
  dtypes = state_dtypes(state)
  jitted = jax.jit(train_step(solver, spec["call"]), donate_argnums=(0, 1))
  call_s = []
  for _ in range(spec["steps"]):
    start = time.perf_counter()
    params, state = jitted(params, state)
    jax.block_until_ready((params, state))
    call_s.append(time.perf_counter() - start)
  compiles = jitted._cache_size()

  jax.clear_caches()
  params = uncommitted_params(spec["leaves"], spec["leaf_size"], spec["seed"])
  state = solver.init(params)
  jax.block_until_ready((params, state))
  jitted = jax.jit(train_step(solver, spec["call"]), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  traced = jitted.trace(params, state)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return {
      "first_call_s": call_s[0],
      "later_calls_s": call_s[1:],
      "compiles": int(compiles),
      "trace_s": t1 - t0,
      "lower_s": t2 - t1,
      "compile_s": t3 - t2,
      "aot_s": t3 - t0,
      "state_dtypes": dtypes,
      "kernel_switch": os.environ.get(KERNEL_SWITCH),
      "cpu_kernel_available": bool(optax_amsgrad.cpu_kernel_available()),
      "device": str(jax.devices()[0]),
  }


class StepVariant:
  """A jitted, donated step (update and apply_updates) over one leaf."""

  def __init__(self, name: str, n: int, grads: dict[str, jax.Array], params: Any):
    self.name = name
    solver = SOLVERS[name]()
    state = solver.init(params)

    def step(params, state, grads):
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.jitted = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = self.jitted.trace(params, state, grads).lower().compile()
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    # Read g and p, write p, read and write the state.
    self.min_bytes = 4 + 8 + 2 * round(state_bytes / n)
    self.info: dict[str, Any] = {
        "compile_s": time.perf_counter() - start,
        "state_bytes": state_bytes,
        "state_dtypes": state_dtypes(state),
        "min_bytes_per_param": self.min_bytes,
        **memory(compiled, n),
    }
    self.grads = grads
    self.carry = [params, state]

  def run(self) -> None:
    params, state = self.jitted(self.carry[0], self.carry[1], self.grads)
    self.carry = [params, state]
    jax.block_until_ready(jax.tree.leaves(params)[0])


def memory(compiled: Any, n: int) -> dict[str, Any]:
  """The temporaries of a compiled, donated step (``memory_analysis``), in
  bytes and in float32 copies of the ``n`` params: below 1, no float32
  temporary the size of the params fits in them."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  temp = int(analysis.temp_size_in_bytes)
  return {"temp_bytes": temp, "temp_float32_params": temp / (4 * n),
          "alias_bytes": int(analysis.alias_size_in_bytes)}


def state_bytes_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """The bytes of each solver's state (``nbytes`` of every state leaf, the
  8-bit blocks' scales and the float32 small leaves included) on the
  transformer-like model, which leaves keep float32 state, and the
  temporaries of its compiled, donated train step."""
  shapes = model_shapes()
  rng = np.random.default_rng(spec["seed"])
  params = {k: jnp.asarray(0.02 * rng.normal(size=v).astype(np.float32))
            for k, v in shapes.items()}
  n = sum(int(p.size) for p in params.values())
  results: dict[str, Any] = {}
  for name in spec["solvers"]:
    solver = SOLVERS[name]()
    state = solver.init(params)
    nbytes = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(state))
    entry: dict[str, Any] = {"state_bytes": nbytes, "bytes_per_param": nbytes / n}
    if name == "ours_int8":
      nu_max = optax.tree.get(state, "nu_max")
      kept = sorted(k for k, v in nu_max.items() if not _blockwise.is_quantized(v))
      entry["float32_leaves"] = kept
      entry["float32_leaf_params"] = sum(int(params[k].size) for k in kept)
      entry["eight_bit_leaves"] = len(nu_max) - len(kept)
      entry["scale_bytes"] = sum(
          int(v.exponents.nbytes) for buffer in ("mu", "nu", "nu_max")
          for v in optax.tree.get(state, buffer).values() if _blockwise.is_quantized(v))
    step = jax.jit(train_step(solver, "update"), donate_argnums=(0, 1))
    entry.update(memory(step.trace(params, state).lower().compile(), n))
    results[name] = entry
  return {"params": n, "leaves": len(shapes), "model": {
      "width": MODEL_WIDTH, "layers": MODEL_LAYERS, "vocabulary": MODEL_VOCAB,
      "classes": MODEL_CLASSES}, "solvers": results}


def step_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """One process, the XLA path: the interleaved step time of every variant."""
  # step_time.py imports torch when it is installed; only this worker needs it.
  import step_time

  n = spec["params"]
  grads = step_time.make_grads([n], spec["seed"])
  variants: list[Any] = [step_time.FloorVariant(n)]
  for name in spec["solvers"]:
    variants.append(StepVariant(name, n, grads, step_time.make_params([n])))
  times = step_time.measure(variants, spec["rounds"], spec["steps"], spec["seed"])
  bandwidth = 12 * n / statistics.median(times["floor"])
  results: dict[str, Any] = {}
  for v in variants:
    entry = {**step_time.summarise(times[v.name]), **v.info}
    if isinstance(v, StepVariant):
      entry["fraction_of_limit"] = v.min_bytes * n / bandwidth / (entry["median_ms"] / 1e3)
    entry["samples_ms"] = [1e3 * t for t in times[v.name]]
    results[v.name] = entry
  base = results[REFERENCE]["median_ms"]
  for entry in results.values():
    entry[f"ratio_vs_{REFERENCE}"] = entry["median_ms"] / base
  return {
      "params": n,
      "rounds": spec["rounds"],
      "steps_per_block": spec["steps"],
      "kernel_switch": os.environ.get(KERNEL_SWITCH),
      "threads": step_time.cpu_threads(),
      "device": str(jax.devices()[0]),
      "bandwidth_GBps": bandwidth / 1e9,
      "limit_ms": 1e3 * 36 * n / bandwidth,
      "variants": results,
  }


# --------------------------------------------------------------------------
# The driving process.


def run_worker(spec: dict[str, Any], kernel: str | None) -> dict[str, Any]:
  """Runs one worker in a fresh process, the kernel switch set for it."""
  env = dict(os.environ)
  env.pop(KERNEL_SWITCH, None)
  if kernel == "off":
    env[KERNEL_SWITCH] = "0"
  result = subprocess.run(
      [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
      capture_output=True, text=True, env=env, timeout=1800,
  )
  lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
  if result.returncode or not lines:
    raise RuntimeError(
        f"worker {spec} failed ({result.returncode}):\n{result.stdout[-3000:]}"
        f"\n{result.stderr[-3000:]}"
    )
  return json.loads(lines[-1][len(RESULT_MARK):])


def environment(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
  """The common provenance, and whether the run was quick."""
  return provenance(command_line("compile_time.py", argv), packages=CORE_PACKAGES,
                    quick=args.quick)


def median_entry(runs: list[dict[str, Any]]) -> dict[str, Any]:
  keys = ("first_call_s", "trace_s", "lower_s", "compile_s", "aot_s")
  out: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in keys}
  out["later_call_s"] = statistics.median(t for r in runs for t in r["later_calls_s"])
  compiles = [r["compiles"] for r in runs]
  out["compiles_min"] = min(compiles)
  out["compiles_max"] = max(compiles)
  return out


def first_call(args: argparse.Namespace) -> dict[str, Any]:
  rng = random.Random(args.seed)
  chosen = {name: variant for name, variant in FIRST_CALL_VARIANTS.items()
            if variant["solver"] in args.solvers and variant["call"] in args.calls}
  runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
  for repeat in range(args.repeats):
    order = list(chosen)
    rng.shuffle(order)
    for name in order:
      if runs[name] and runs[name][0]["first_call_s"] + runs[name][0]["aot_s"] > args.slow_s:
        continue
      variant = FIRST_CALL_VARIANTS[name]
      spec = {
          "kind": "first_call", "solver": variant["solver"], "call": variant["call"],
          "leaves": args.leaves, "leaf_size": args.leaf_size, "steps": args.loop_steps,
          "seed": args.seed,
      }
      row = run_worker(spec, variant["kernel"])
      runs[name].append(row)
      print(f"  repeat {repeat + 1}/{args.repeats} {name:28s} first call "
            f"{row['first_call_s']:7.2f} s, trace + lower + compile {row['aot_s']:7.2f} s "
            f"({row['trace_s']:.2f} + {row['lower_s']:.2f} + {row['compile_s']:.2f}), "
            f"{row['compiles']} compiled", flush=True)
  variants: dict[str, Any] = {}
  for name, variant in chosen.items():
    variants[name] = {
        **variant, "processes": len(runs[name]), "median": median_entry(runs[name]),
        "runs": runs[name],
    }
  base = variants[REFERENCE]["median"]
  for entry in variants.values():
    entry[f"ratio_vs_{REFERENCE}"] = {
        key: entry["median"][key] / base[key] for key in ("first_call_s", "aot_s")
    }
  return {
      "leaves": args.leaves,
      "leaf_size": args.leaf_size,
      "params": args.leaves * args.leaf_size,
      "loop_steps": args.loop_steps,
      "repeats": args.repeats,
      "slow_s": args.slow_s,
      "variants": variants,
  }


def fmt_compiles(median: dict[str, Any]) -> str:
  low, high = median["compiles_min"], median["compiles_max"]
  return str(low) if low == high else f"{low} to {high}"


def print_tables(report: dict[str, Any]) -> None:
  fc = report["first_call"]
  print(f"\nFirst call, {fc['leaves']} leaves of {fc['leaf_size']:,} float32 params, medians "
        f"over processes (ratios to {REFERENCE}):")
  print("| variant | processes | trace | lower | compile | trace + lower + compile | ratio "
        f"| first call | ratio | later calls | compiled over {fc['loop_steps']} steps |")
  print("|---" * 11 + "|")
  for name, entry in fc["variants"].items():
    m, r = entry["median"], entry[f"ratio_vs_{REFERENCE}"]
    print(f"| {name} | {entry['processes']} | {m['trace_s']:.2f} s | {m['lower_s']:.2f} s "
          f"| {m['compile_s']:.2f} s | {m['aot_s']:.2f} s | {r['aot_s']:.2f} "
          f"| {m['first_call_s']:.2f} s | {r['first_call_s']:.2f} "
          f"| {1e3 * m['later_call_s']:.1f} ms | {fmt_compiles(m)} |")
  if "state_bytes" in report:
    sb = report["state_bytes"]
    print(f"\nState on a transformer-like model of {sb['params']:,} params "
          f"({sb['leaves']} leaves); temporaries of its donated step:")
    print("| solver | state bytes per param | temporaries (float32 copies of the params) |")
    print("|---|---|---|")
    for name, entry in sb["solvers"].items():
      print(f"| {name} | {entry['bytes_per_param']:.3f} "
            f"| {entry.get('temp_float32_params', float('nan')):.3f} |")
    int8 = sb["solvers"].get("ours_int8")
    if int8:
      print(f"8-bit: {int8['eight_bit_leaves']} leaves in blocks; float32 state for "
            f"{len(int8['float32_leaves'])} leaves ({int8['float32_leaf_params']:,} params): "
            f"{', '.join(int8['float32_leaves'])}")
  if "step_time" not in report:
    return
  st = report["step_time"]
  print(f"\nStep time on the XLA path, one leaf of {st['params']:.0e} float32 params, "
        f"bandwidth {st['bandwidth_GBps']:.1f} GB/s:")
  print("| variant | median | q1 to q3 | ratio | fraction of the limit "
        "| temporaries (float32 copies of the params) |")
  print("|---|---|---|---|---|---|")
  for name, entry in st["variants"].items():
    limit = entry.get("fraction_of_limit")
    temp = entry.get("temp_float32_params")
    print(f"| {name} | {entry['median_ms']:.2f} ms | {entry['q1_ms']:.2f} to "
          f"{entry['q3_ms']:.2f} ms | {entry[f'ratio_vs_{REFERENCE}']:.2f} "
          f"| {'-' if limit is None else f'{limit:.2f}'} "
          f"| {'-' if temp is None else f'{temp:.3f}'} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="20 leaves, 1 repeat, 1e6 params: a smoke test, not the figures")
  parser.add_argument("--repeats", type=int, default=None,
                      help="processes per first-call variant (default 3, quick 1)")
  parser.add_argument("--slow-s", type=float, default=60.0,
                      help="a variant whose first process took longer (first call plus "
                      "trace, lower and compile) runs only once")
  parser.add_argument("--leaves", type=int, default=None, help="default 500, quick 20")
  parser.add_argument("--leaf-size", type=int, default=2_000)
  parser.add_argument("--loop-steps", type=int, default=3,
                      help="steps of the loop whose compiles are counted")
  parser.add_argument("--params", type=int, default=None,
                      help="params of the step-time leaf (default 1e7, quick 1e6)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="interleaved step-time rounds (default 20, quick 3)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per block, after one dropped step (default 5, quick 2)")
  parser.add_argument("--no-step-time", action="store_true")
  parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                      help=f"comma-separated, of {', '.join(SOLVERS)} (default "
                      f"{','.join(DEFAULT_SOLVERS)}; {REFERENCE} is always measured)")
  parser.add_argument("--calls", default="update,apply_step",
                      help="the first call of which steps: update, apply_step or both")
  parser.add_argument("--state-bytes", action="store_true",
                      help="also the state's bytes per param and the step's temporaries "
                      "on a transformer-like model of 5e6 params")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=None, help="JSON output path")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  solvers = [name for name in args.solvers.split(",") if name]
  unknown = sorted(set(solvers) - set(SOLVERS))
  if unknown:
    parser.error(f"--solvers: unknown {unknown}; known: {sorted(SOLVERS)}")
  args.solvers = [REFERENCE, *(name for name in solvers if name != REFERENCE)]
  args.calls = [call for call in args.calls.split(",") if call]
  if not args.calls or set(args.calls) - {"update", "apply_step"}:
    parser.error(f"--calls: update, apply_step or both, not {args.calls}")
  quick = args.quick
  for key, full, small in (("repeats", 3, 1), ("leaves", 500, 20), ("params", 10_000_000,
                           1_000_000), ("rounds", 20, 3), ("steps", 5, 2)):
    if getattr(args, key) is None:
      setattr(args, key, small if quick else full)
  if args.out is None:
    args.out = ROOT / "results" / (
        "compile_time_quick.json" if quick else "compile_time.json"
    )
  return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.worker is not None:
    spec = json.loads(args.worker)
    worker = {"first_call": first_call_worker, "step": step_worker,
              "state_bytes": state_bytes_worker}[spec["kind"]]
    print(RESULT_MARK + json.dumps(worker(spec)), flush=True)
    return None

  report: dict[str, Any] = {"meta": environment(args, argv)}
  meta = report["meta"]
  print(f"{meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPUs, load average "
        f"{meta['machine']['load_average_start']}; commit {meta['commit']}"
        f"{' (dirty tree)' if meta['dirty'] else ''}", flush=True)
  print(f"first call: {args.leaves} leaves of {args.leaf_size:,}, {args.repeats} repeats ...",
        flush=True)
  report["first_call"] = first_call(args)
  meta["solvers"] = args.solvers
  kernel_variant = next((v for k, v in report["first_call"]["variants"].items()
                         if k.endswith("/kernel")), report["first_call"]["variants"][REFERENCE])
  kernel_run = kernel_variant["runs"][0]
  meta["machine"]["device"] = kernel_run["device"]
  # Without the switch: whether the kernel variants had the kernel to run.
  meta["cpu_kernel_available"] = kernel_run["cpu_kernel_available"]
  if not args.no_step_time:
    print(f"step time on the XLA path, {args.params:.0e} params ...", flush=True)
    spec = {"kind": "step", "params": args.params, "rounds": args.rounds,
            "steps": args.steps, "seed": args.seed,
            "solvers": [name for name in STEP_VARIANTS if name in args.solvers]}
    report["step_time"] = run_worker(spec, "off")
  if args.state_bytes:
    print("state bytes and temporaries on the model ...", flush=True)
    spec = {"kind": "state_bytes", "seed": args.seed, "solvers": args.solvers}
    report["state_bytes"] = run_worker(spec, None)
  meta["machine"]["load_average_end"] = load_average()
  print_tables(report)
  print(f"\nload average (1, 5, 15 min) at the start {meta['machine']['load_average_start']}, "
        f"at the end {meta['machine']['load_average_end']}")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
