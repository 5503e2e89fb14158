"""Step time by position in a block of back-to-back steps, after a pause.

Interleaved benchmarks run each variant right after another one. A library
whose threads keep spinning after its last step takes a core from whatever
runs next: on a 2-core machine that slows the next variant's first
milliseconds. This script alternates blocks of ``apply_step`` (tree layout,
jitted, donated) and torch fused ``Adam(amsgrad=True)`` with a sleep between
blocks, prints the median time of each step of a block, and the CPU time the
process used during the sleep after each variant's block (its threads'
spinning). With ``--busy`` the pause busy-waits on the calling thread instead
of sleeping, so that its core never idles.

  python benchmarks/after_switch.py                    # 1e6 params, 3 and 20 ms
  python benchmarks/after_switch.py --busy --pauses-ms 20
  python benchmarks/after_switch.py --quick            # a smoke test

``--out PATH`` writes the figures as JSON with the commit, machine and
versions of the run (``benchmarks/results/after_switch.json`` is the one that
``benchmarks/render.py`` renders).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import CORE_PACKAGES, command_line, load_average, provenance

# The variants, their data and thread counts are step_time.py's (this
# script's directory is on sys.path when it runs).
from step_time import JaxVariant, TorchVariant, cpu_threads, make_grads, torch


def pause(seconds: float, busy: bool) -> None:
  if not busy:
    time.sleep(seconds)
    return
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    pass


def measure(
    steps: dict[str, Callable[[], None]], rounds: int, block: int, seconds: float, busy: bool
) -> tuple[dict[str, list[float]], dict[str, float]]:
  """Median seconds of each step of a block, and median CPU seconds the
  process used during the pause after the block, per variant."""
  per_step: dict[str, list[list[float]]] = {name: [[] for _ in range(block)] for name in steps}
  cpu_after: dict[str, list[float]] = {name: [] for name in steps}
  for run in steps.values():  # compile and first touch
    for _ in range(3):
      run()
  for _ in range(rounds):
    for name, run in steps.items():
      for k in range(block):
        start = time.perf_counter()
        run()
        per_step[name][k].append(time.perf_counter() - start)
      cpu = time.process_time()
      pause(seconds, busy)
      cpu_after[name].append(time.process_time() - cpu)
  return ({name: [float(np.median(s)) for s in samples] for name, samples in per_step.items()},
          {name: float(np.median(s)) for name, s in cpu_after.items()})


def positive_int(text: str) -> int:
  value = int(float(text))
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {text}")
  return value


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=positive_int, default=1_000_000)
  parser.add_argument("--rounds", type=positive_int, default=30)
  parser.add_argument("--block", type=positive_int, default=20,
                      help="back-to-back steps after each pause")
  parser.add_argument("--pauses-ms", type=float, nargs="+", default=[3.0, 20.0],
                      help="sleep between blocks, one run per value")
  parser.add_argument("--busy", action="store_true",
                      help="busy-wait on the calling thread instead of sleeping")
  parser.add_argument("--quick", action="store_true",
                      help="5,000 params, 2 rounds, blocks of 3, pauses of 0 and 1 ms: a "
                      "smoke test")
  parser.add_argument("--out", type=Path, help="JSON output path")
  args = parser.parse_args(argv)
  if args.quick:
    args.params, args.rounds, args.block, args.pauses_ms = 5_000, 2, 3, [0.0, 1.0]
  if any(p < 0 for p in args.pauses_ms):
    parser.error("--pauses-ms must not be negative")

  if torch is not None:
    torch.set_num_threads(cpu_threads())
  packages = CORE_PACKAGES if torch is None else (*CORE_PACKAGES, "torch")
  meta = provenance(command_line("after_switch.py", argv), packages=packages, quick=args.quick)
  meta["torch_threads"] = None if torch is None else torch.get_num_threads()
  grads = make_grads([args.params], seed=0)
  steps = {"apply_step": JaxVariant("ours.apply_step", [args.params], grads).run}
  if torch is not None:
    steps["torch_fused"] = TorchVariant("torch_fused", [args.params], grads).run
  runs = []
  for pause_ms in args.pauses_ms:
    medians, cpu_after = measure(steps, args.rounds, args.block, pause_ms / 1e3,
                                  args.busy)
    runs.append({"pause_ms": pause_ms, "busy": args.busy,
                 "median_ms_by_step": {k: [1e3 * t for t in v] for k, v in medians.items()},
                 "cpu_ms_during_pause_after": {k: 1e3 * t for k, t in cpu_after.items()}})
    how = "busy-wait" if args.busy else "sleep"
    print(f"\n{args.params:.0e} params, {pause_ms:g} ms {how} between blocks, medians of "
          f"{args.rounds} blocks; ms per step by position in the block, then the CPU "
          f"time the process used during the pause after the block")
    print("| variant | " + " | ".join(str(k) for k in range(args.block)) + " | CPU in pause |")
    print("|---|" + "---|" * (args.block + 1))
    for name, per_step in medians.items():
      cells = " | ".join(f"{1e3 * t:.2f}" for t in per_step)
      print(f"| {name} | {cells} | {1e3 * cpu_after[name]:.2f} ms |")
  if args.out is not None:
    meta["machine"]["load_average_end"] = load_average()
    report: dict[str, Any] = {
        "meta": meta,
        "params": args.params,
        "rounds": args.rounds,
        "block": args.block,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
