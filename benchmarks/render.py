"""Renders the stored benchmark results into the READMEs as markdown tables.

A block in ``README.md`` or ``benchmarks/README.md`` is the text between::

  <!-- render:NAME -->
  <!-- /render:NAME -->

and is rendered from the JSON in ``benchmarks/results``. Blocks:

* ``compile_time``: both tables of ``compile_time.json``,
* ``compile_time.first_call``: first call and compiles of the train step,
* ``compile_time.step_time``: the step time on the XLA path.

Every table is followed by a line naming the commit, machine and versions of
the run it came from.

Run::

  python benchmarks/render.py            # rewrite the blocks from the results
  python benchmarks/render.py --check    # exit 1, naming the block, if any differs
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/README.md")
BLOCK = re.compile(
    r"<!-- render:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /render:(?P=name) -->", re.DOTALL
)
OPENING = re.compile(r"<!-- render:([\w.-]+) -->")
REFERENCE = "optax.amsgrad"

SOLVER_NAMES = {
    "optax.amsgrad": ("`optax.amsgrad`", "float32"),
    "ours": ("`optax_amsgrad.amsgrad`", "float32"),
    "ours_bf16": ("`optax_amsgrad.amsgrad`", "bfloat16, stochastic rounding"),
}


def load(root: Path, name: str) -> dict[str, Any]:
  return json.loads((root / "benchmarks" / "results" / f"{name}.json").read_text())


def provenance(report: dict[str, Any], runs: str) -> str:
  meta = report["meta"]
  machine, versions = meta["machine"], meta["versions"]
  commit = "unknown commit" if not meta.get("commit") else f"commit `{meta['commit'][:10]}`"
  if meta.get("dirty"):
    changed = meta.get("changed_paths") or []
    if changed and all(line.startswith("??") for line in changed):
      commit += " and untracked files"
    else:
      commit += " with uncommitted changes"
  load_start, load_end = machine.get("load_average_start"), machine.get("load_average_end")
  load_text = ""
  if load_start:
    load_text = f", load average {load_start[0]:.2f} at the start"
    if load_end:
      load_text += f" and {load_end[0]:.2f} at the end"
  packages = ", ".join(
      f"{name} {versions[key]}"
      for key, name in (("python", "Python"), ("jax", "jax"), ("jaxlib", "jaxlib"),
                        ("optax", "optax"), ("numpy", "numpy"))
      if versions.get(key)
  )
  return (
      f"*`{meta['command']}`, {runs}; {commit}; {machine.get('cpu') or machine['processor']}, "
      f"{machine['cpu_count']} CPUs, {machine['platform']}{load_text}; {packages}.*"
  )


def compile_first_call(root: Path) -> str:
  report = load(root, "compile_time")
  fc = report["first_call"]
  lines = [
      "| optimizer | step | state | path | trace + lower + compile | vs `optax.amsgrad` "
      f"| first call | vs `optax.amsgrad` | compiled in {fc['loop_steps']} steps |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for entry in fc["variants"].values():
    solver, state = SOLVER_NAMES[entry["solver"]]
    step = "`update` + `apply_updates`" if entry["call"] == "update" else "`apply_step`"
    path = {None: "XLA", "off": "XLA (kernel off)", "on": "CPU kernel"}[entry["kernel"]]
    median, ratio = entry["median"], entry[f"ratio_vs_{REFERENCE}"]
    low, high = median["compiles_min"], median["compiles_max"]
    compiles = str(low) if low == high else f"{low} to {high}"
    lines.append(
        f"| {solver} | {step} | {state} | {path} | {median['aot_s']:.2f} s "
        f"| {ratio['aot_s']:.2f} | {median['first_call_s']:.2f} s "
        f"| {ratio['first_call_s']:.2f} | {compiles} |"
    )
  counts = {entry["processes"] for entry in fc["variants"].values()}
  if len(counts) == 1:
    count = counts.pop()
    processes = ("one process per row" if count == 1
                 else f"medians of {count} processes per row")
  else:
    processes = (f"medians of {fc['repeats']} processes per row, of fewer where one took "
                 f"over {fc['slow_s']:.0f} s: " + ", ".join(
                     f"{entry['processes']} for {name}" for name, entry in fc["variants"].items()
                     if entry["processes"] != fc["repeats"]))
  runs = f"{fc['leaves']} leaves of {fc['leaf_size']:,} float32 params, {processes}"
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


def compile_step_time(root: Path) -> str:
  report = load(root, "compile_time")
  st = report["step_time"]
  lines = [
      "| step | state | median | q1 to q3 | vs `optax.amsgrad` | fraction of the limit |",
      "|---|---|---|---|---|---|",
  ]
  for name, entry in st["variants"].items():
    if name == "floor":
      step, state = f"`a + s * b` ({st['bandwidth_GBps']:.1f} GB/s)", "-"
    else:
      solver, state = SOLVER_NAMES[name]
      step = solver
    limit = entry.get("fraction_of_limit")
    lines.append(
        f"| {step} | {state} | {entry['median_ms']:.2f} ms "
        f"| {entry['q1_ms']:.2f} to {entry['q3_ms']:.2f} ms "
        f"| {entry[f'ratio_vs_{REFERENCE}']:.2f} "
        f"| {'-' if limit is None else f'{limit:.2f}'} |"
    )
  runs = (f"one leaf of {st['params']:,} float32 params, `OPTAX_AMSGRAD_CPU_KERNEL=0`, "
          f"medians of {st['rounds']} interleaved rounds of {st['steps_per_block']} kept steps")
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


def compile_both(root: Path) -> str:
  return compile_first_call(root) + "\n\n" + compile_step_time(root)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "compile_time": compile_both,
    "compile_time.first_call": compile_first_call,
    "compile_time.step_time": compile_step_time,
}


def render_text(text: str, root: Path, where: str) -> tuple[str, list[str], list[str]]:
  """The text with every block rendered, the names of the blocks, and errors."""
  names: list[str] = []
  errors: list[str] = []
  closed = {match.start() for match in BLOCK.finditer(text)}
  for match in OPENING.finditer(text):
    if match.start() not in closed:
      errors.append(f"{where}: block {match.group(1)} has no <!-- /render:{match.group(1)} -->")

  def replace(match: re.Match[str]) -> str:
    name = match.group("name")
    names.append(name)
    if name not in RENDERERS:
      errors.append(f"{where}: unknown block {name} (known: {', '.join(RENDERERS)})")
      return match.group(0)
    return f"<!-- render:{name} -->\n\n{RENDERERS[name](root)}\n\n<!-- /render:{name} -->"

  return BLOCK.sub(replace, text), names, errors


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a block differs from the results")
  parser.add_argument("--root", type=Path, default=ROOT, help="the repository's root")
  args = parser.parse_args(argv)
  failed = False
  for relative in READMES:
    path = args.root / relative
    if not path.exists():
      continue
    text = path.read_text()
    rendered, names, errors = render_text(text, args.root, relative)
    for error in errors:
      print(error, file=sys.stderr)
    failed |= bool(errors)
    if rendered == text:
      continue
    if not args.check:
      path.write_text(rendered)
      print(f"rendered {relative}: {', '.join(names)}")
      continue
    failed = True
    old_blocks = {m.group("name"): m.group(0) for m in BLOCK.finditer(text)}
    new_blocks = {m.group("name"): m.group(0) for m in BLOCK.finditer(rendered)}
    for name in names:
      if old_blocks.get(name) != new_blocks.get(name):
        print(f"{relative}: block {name} differs from what the stored results give "
              "(python benchmarks/render.py rewrites it):", file=sys.stderr)
        diff = difflib.unified_diff(
            old_blocks[name].splitlines(), new_blocks[name].splitlines(),
            "in " + relative, "rendered", lineterm="", n=0,
        )
        print("\n".join(diff), file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
