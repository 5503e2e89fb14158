"""Renders the stored benchmark results into the READMEs as markdown tables.

A block in ``README.md``, ``benchmarks/README.md`` or a page of the site
(``docs/**/*.md``) is the text between::

  <!-- render:NAME -->
  <!-- /render:NAME -->

and is rendered from the JSON in ``benchmarks/results``. Blocks:

* ``compile_time``: both tables of ``compile_time.json``,
* ``compile_time.first_call``: first call and compiles of the train step,
* ``compile_time.step_time``: the step time on the XLA path,
* ``step_time.vs_torch_fused``: step time relative to torch fused (``README.md``),
* ``step_time.limit_first_call``: fraction of the reference rate, first call and the
  1e7 medians (``README.md``),
* ``step_time.one_pass``: the kernels of one step and their 1e7 step time,
* ``step_time.vs_optax``: step time relative to ``optax.amsgrad``,
* ``step_time.vs_torch_and_limit``: ratio to torch fused and fraction of the reference rate,
* ``step_time.compiled``: kernels, bytes per parameter and temporaries,
* ``step_time.first_call``: the first call against the number of leaves,
* ``step_time_steady``: ratio to torch fused with more kept steps per block,
* ``after_switch``: step time by position in a block after a pause,
* ``state_precision``: quality, state bytes and step time of each state dtype,
* ``state_precision.open_loop``: the bias of the stored ``nu``, open loop,
* ``checkpoint_cost``: step time with and without saving checkpoints,
* ``parity``: the maximum relative difference of every parity case, live and
  against the recorded trajectories (``parity.json``, from
  ``benchmarks/parity_report.py``),
* ``step_time.update_vs_fused``: one sentence, ``update`` and ``apply_step``
  against torch fused over one large leaf (the FAQ).

Every table is followed by a line naming the run it came from, read from the
``meta`` that ``benchmarks/machine.py``'s ``provenance`` writes into every
result: the command, the commit (and whether the tree had changes), the date,
the CPU with its widest vector extension (avx512f or avx2), the threads, the
load average and the versions of jax, jaxlib, optax and, where used, torch
and orbax-checkpoint. Results from before that ``meta`` are read as far as
they go ("unknown commit" where they name none).

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
# The site's pages hold blocks too (the guides carry most of the tables).
DOCS_PAGES = "docs/**/*.md"
DOCS_SKIPPED = ("docs/_build/", "docs/notebooks/")


def documents(root: Path) -> list[str]:
  """The files whose blocks are rendered: the READMEs and the site's pages."""
  pages = sorted(str(path.relative_to(root)) for path in root.glob(DOCS_PAGES))
  return [*READMES, *(page for page in pages if not page.startswith(DOCS_SKIPPED))]
BLOCK = re.compile(
    r"<!-- render:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /render:(?P=name) -->", re.DOTALL
)
OPENING = re.compile(r"<!-- render:([\w.-]+) -->")
REFERENCE = "optax.amsgrad"
RESULTS_PATH = "benchmarks/results/"

SOLVER_NAMES = {
    "optax.amsgrad": ("`optax.amsgrad`", "float32"),
    "ours": ("`optax_amsgrad.amsgrad`", "float32"),
    "ours_bf16": ("`optax_amsgrad.amsgrad`", "bfloat16, stochastic rounding"),
}


def load(root: Path, name: str) -> dict[str, Any]:
  return json.loads((root / "benchmarks" / "results" / f"{name}.json").read_text())


# The versions the line under a table names, where the run recorded them.
PACKAGES = ("jax", "jaxlib", "optax", "torch", "torchao", "keras", "orbax-checkpoint")
# The vector extensions that bound a streaming step, widest first: the line
# names the widest the machine had.
SIMD = (("avx512f", "avx512_bf16"), ("avx2",))


def meta_of(report: dict[str, Any]) -> dict[str, Any]:
  """A stored result's ``meta``, in the form ``machine.provenance`` writes.

  Results measured before that form (their ``machine`` has no ``cpu_flags``)
  are read by ``legacy_meta``.
  """
  meta = report.get("meta") or {}
  if "cpu_flags" in (meta.get("machine") or {}):
    return meta
  return legacy_meta(report)


def legacy_meta(report: dict[str, Any]) -> dict[str, Any]:
  """The common form of a result from before it: what it recorded, None for the rest.

  Those kept their facts in a flat ``meta`` (``step_time``), at the top level
  (``state_precision``, ``after_switch``) or in a ``meta`` without the CPU's
  flags and threads (``compile_time``, ``checkpoint_cost``).
  """
  old = dict(report.get("meta") or {})
  for key in ("command", "machine", "jax", "torch"):
    if key in report:
      old.setdefault(key, report[key])
  machine = dict(old.get("machine") or {})
  versions = dict(old.get("versions") or {})
  for key in ("python", *PACKAGES):
    value = old.get(key) or machine.pop(key, None)
    if value:
      versions.setdefault(key, value)
  for key in ("cpu", "cpu_threads", "load_average_start", "load_average_end"):
    if key in old:
      machine.setdefault(key, old[key])
  for key in ("cpu", "cpu_flags", "cpu_count", "cpu_threads", "load_average_start"):
    machine.setdefault(key, None)
  return {**old, **{key: old.get(key) for key in ("time", "commit", "dirty", "changed_paths")},
          "machine": machine, "versions": versions}


def provenance(report: dict[str, Any], runs: str) -> str:
  """The line under a table: command, runs, commit, date, machine and versions.

  Args:
    report: a stored result; its ``meta`` as ``machine.provenance`` writes it
      (or an older form, see ``legacy_meta``).
    runs: what the rows are medians of, in words.

  Returns:
    The line, in italics.
  """
  meta = meta_of(report)
  machine, versions = meta["machine"], meta["versions"]
  commit = f"commit `{meta['commit'][:10]}`" if meta["commit"] else "unknown commit"
  # Stored results written earlier in the same series of runs are not
  # changes to what was measured.
  changed = [line for line in meta["changed_paths"] or []
             if not line[3:].startswith(RESULTS_PATH)]
  if meta["dirty"] and (changed or not meta["changed_paths"]):
    if changed and all(line.startswith("??") for line in changed):
      commit += " and untracked files"
    else:
      commit += " with uncommitted changes"
  if meta["time"]:
    commit += f", {meta['time'][:10]}"
  cpu = machine["cpu"]
  flags = machine["cpu_flags"] or []
  widest = next((group for group in SIMD if group[0] in flags), ())
  if cpu and widest:
    cpu += " with " + ", ".join(flag for flag in widest if flag in flags)
  threads, count = machine["cpu_threads"], machine["cpu_count"]
  cores = None
  if threads:
    cores = f"{threads} threads" + (f" of {count} CPUs" if count and count != threads else "")
  elif count:
    cores = f"{count} CPUs"
  load_start, load_end = machine["load_average_start"], machine.get("load_average_end")
  load = None
  if load_start:
    load = f"load average {load_start[0]:.2f} at the start"
    if load_end:
      load += f" and {load_end[0]:.2f} at the end"
  where = ", ".join(part for part in (cpu, cores, load) if part)
  packages = ", ".join(f"{name} {versions[name]}" for name in PACKAGES if versions.get(name))
  parts = [f"`{meta['command'].strip()}`, {runs}", commit, where, packages]
  return "*" + "; ".join(part for part in parts if part) + ".*"


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
      "| step | state | median | q1 to q3 | vs `optax.amsgrad` | fraction of the reference rate |",
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


MINUS = "\u2212"
STEP_NAMES = {
    "ours": "ours",
    "ours.apply_step": "ours.apply_step",
    "ours_flat": "ours_flat",
    "ours_flat.apply_step": "ours_flat.apply_step",
    "optax.amsgrad": "optax.amsgrad",
    "optax.amsgrad_no_donation": "no donation",
    "optax.adam": "optax.adam",
    "torch_fused": "torch fused",
    "torch_foreach": "torch foreach",
}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """Markdown lines of a table."""
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(row) + " |" for row in rows)]


def signed_percent(value: float, digits: int = 2) -> str:
  """``value`` as a percentage with its sign, a true minus for negatives."""
  text = f"{abs(value) * 100:.{digits}f}%"
  return (MINUS if value < 0 else "+") + text


def short_count(n: int) -> str:
  """``1000000`` as ``1e6``, ``30000000`` as ``3e7``; other counts with commas."""
  exponent = len(str(n)) - 1
  if n > 0 and n % 10**exponent == 0 and exponent >= 3:
    return f"{n // 10**exponent}e{exponent}"
  return f"{n:,}"


def step_time_runs(report: dict[str, Any]) -> str:
  meta = meta_of(report)
  threads = f"jax on {meta['machine']['cpu_threads']} threads"
  if meta.get("torch_threads"):
    threads += f", torch on {meta['torch_threads']}"
  return (f"medians of {meta['rounds']} interleaved rounds of {meta['steps_per_block']} "
          f"kept steps, {threads}")


def step_time_provenance(report: dict[str, Any]) -> str:
  return provenance(report, step_time_runs(report))


def one_leaf_case(report: dict[str, Any], params: int) -> dict[str, Any]:
  """The case of one leaf of ``params`` parameters."""
  for case in report["cases"]:
    if case["leaves"] == 1 and case["params"] == params:
      return case
  raise KeyError(f"no case of one leaf of {params} params")


def case_label(case: dict[str, Any]) -> str:
  if case["leaves"] == 1:
    return f"{short_count(case['params'])}, one leaf"
  return f"{case['leaves']} leaves x {case['leaf_size']:,}"


def step_time_vs_torch_fused(root: Path) -> str:
  report = load(root, "step_time")
  columns = (("ours", "`update`"), ("ours.apply_step", "`apply_step`"),
             ("ours_flat", "flat, `update`"), ("ours_flat.apply_step", "**flat, `apply_step`**"),
             ("optax.amsgrad", "optax.amsgrad"),
             ("optax.amsgrad_no_donation", "optax.amsgrad, no donation"),
             ("torch_foreach", "torch foreach"))
  rows = []
  for case in report["cases"]:
    cells = []
    for name, _ in columns:
      cell = f"{case['variants'][name]['ratio_vs_torch_fused']:.2f}"
      cells.append(f"**{cell}**" if name == "ours_flat.apply_step" else cell)
    rows.append([case_label(case), *cells])
  lines = table(["params", *(title for _, title in columns)], rows)
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


def step_time_limit_first_call(root: Path) -> str:
  report = load(root, "step_time")
  columns = (("ours", "`update`"), ("ours.apply_step", "`apply_step`"),
             ("ours_flat", "flat, `update`"), ("ours_flat.apply_step", "flat, `apply_step`"),
             ("optax.amsgrad", "optax.amsgrad"), ("torch_fused", "torch fused"))
  rows = []
  for case in report["cases"]:
    if case["leaves"] == 1 and case["params"] >= 10**7:
      rows.append([f"fraction of the reference rate, {short_count(case['params'])}",
                   *(f"{case['variants'][name]['fraction_of_limit']:.2f}"
                     for name, _ in columns)])
  most = max(row["leaves"] for row in report["compile"])
  first = {row["variant"]: row["total_s"] for row in report["compile"] if row["leaves"] == most}
  cells = []
  for name, _ in columns:
    if name not in first:
      cells.append("\u2013")
      continue
    cell = f"{first[name]:.2f} s"
    cells.append(f"**{cell}**" if name == "ours_flat.apply_step" else cell)
  rows.append([f"first call, {most} leaves", *cells])
  lines = table(["", *(title for _, title in columns)], rows)
  case = one_leaf_case(report, 10**7)
  variants = case["variants"]
  names = (("ours.apply_step", "`apply_step`"), ("ours_flat.apply_step", "flat `apply_step`"),
           ("torch_fused", "torch fused"), ("ours", "`update`"),
           ("optax.amsgrad", "`optax.amsgrad`"))
  timed = sorted(names, key=lambda item: variants[item[0]]["median_ms"])
  medians = ", ".join(f"{title} {variants[name]['median_ms']:.2f} ms" for name, title in timed)
  floor = variants["floor"]
  sentence = (
      f"Median step times at {short_count(case['params'])} parameters: {medians}, with a "
      f"streaming floor of {floor['median_ms']:.2f} ms for `a + s*b` "
      f"({case['bandwidth_GBps']:.1f} GB/s, so a reference time of {case['limit_ms']:.2f} ms at "
      f"{variants['ours']['min_bytes_per_param']} bytes per parameter)."
  )
  return "\n".join(lines) + "\n\n" + sentence + "\n\n" + step_time_provenance(report)


def step_time_one_pass(root: Path) -> str:
  report = load(root, "step_time")
  case = one_leaf_case(report, 10**7)
  rows = (
      ("optax.amsgrad", "`optax.amsgrad`", "4 XLA passes", "52"),
      ("ours", "`ours`: handler (reads g, m, v, v_max; writes m, v, v_max) + one XLA kernel "
       "(update, learning rate and `apply_updates`: reads p, m, v_max; writes p)",
       "1 + 1", "28 + 16 = 44"),
      ("ours.apply_step", "`ours.apply_step`: handler with the params", "1", "36"),
      ("ours_flat.apply_step", "`ours_flat.apply_step`: the same over a flat state", "1", "36"),
      ("torch_fused", "torch fused", "1", "36"),
  )
  lines = table(
      ["step", "kernels per leaf", "bytes/param",
       f"{short_count(case['params'])} params (run below)"],
      [[title, kernels, moved, f"{case['variants'][name]['median_ms']:.2f} ms"]
       for name, title, kernels, moved in rows],
  )
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


LATEST_RUN = ("ours", "ours.apply_step", "ours_flat", "ours_flat.apply_step", "optax.amsgrad")


def step_time_vs_optax(root: Path) -> str:
  report = load(root, "step_time")
  columns = (*LATEST_RUN, "optax.amsgrad_no_donation", "optax.adam", "torch_fused",
             "torch_foreach")
  lines = table(
      ["params", *(STEP_NAMES[name] for name in columns)],
      [[case["name"], *(f"{case['variants'][name][f'ratio_vs_{REFERENCE}']:.2f}"
                        for name in columns)]
       for case in report["cases"]],
  )
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


def step_time_vs_torch_and_limit(root: Path) -> str:
  report = load(root, "step_time")
  limit = (*LATEST_RUN, "torch_fused")
  rows = []
  for case in report["cases"]:
    variants = case["variants"]
    rows.append([
        case["name"],
        *(f"{variants[name]['ratio_vs_torch_fused']:.2f}" for name in LATEST_RUN),
        " / ".join(f"{variants[name]['fraction_of_limit']:.2f}" for name in limit),
    ])
  lines = table(
      ["params", *LATEST_RUN, "fraction of the reference rate: ours / apply_step / flat / flat "
       "apply_step / optax / torch fused"], rows)
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


def step_time_compiled(root: Path) -> str:
  report = load(root, "step_time")
  one = next(case for case in report["cases"] if case["leaves"] == 1)
  many = max(report["cases"], key=lambda case: case["leaves"])

  def figures(case: dict[str, Any], name: str) -> str:
    entry = case["variants"][name]
    return (f"{entry['fusions']:,} / {entry['bytes_accessed_per_param']:.1f} / "
            f"{entry['temp_fraction_of_state'] * 100:.2f}%")

  names = ("ours", "ours.apply_step", "ours_flat.apply_step", "optax.amsgrad")
  lines = ["Kernels / XLA's bytes per parameter (a handler call counts 0) / temporaries:"]
  for index, name in enumerate(names):
    if index == 0:
      text = (f"`{name}` {figures(one, name)} at one leaf, {figures(many, name)} at "
              f"{many['leaves']} leaves")
    else:
      text = f"`{name}` {figures(one, name)} and {figures(many, name)}"
    lines.append(text + (";" if index < len(names) - 1 else "."))
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


def step_time_first_call(root: Path) -> str:
  report = load(root, "step_time")
  sizes = {row["leaf_size"] for row in report["compile"]}
  times = {(row["leaves"], row["variant"]): row["total_s"] for row in report["compile"]}
  leaves = sorted({row["leaves"] for row in report["compile"]})
  lines = [
      "First call (trace + lower + compile), leaves of "
      + " or ".join(f"{size:,}" for size in sorted(sizes)) + " parameters:",
      "",
      *table(["leaves", *LATEST_RUN],
             [[str(count), *(f"{times[count, name]:.2f} s" if (count, name) in times else "-"
                             for name in LATEST_RUN)]
              for count in leaves]),
  ]
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


def step_time_steady(root: Path) -> str:
  report = load(root, "step_time_steady")
  columns = (*LATEST_RUN, "optax.adam", "torch_foreach")
  lines = table(
      ["params", *(STEP_NAMES[name] for name in columns), "torch fused"],
      [[case["name"], *(f"{case['variants'][name]['ratio_vs_torch_fused']:.2f}"
                        for name in columns),
        f"{case['variants']['torch_fused']['median_ms']:.2f} ms"]
       for case in report["cases"]],
  )
  return "\n".join(lines) + "\n\n" + step_time_provenance(report)


AFTER_SWITCH_NAMES = {"apply_step": "apply_step", "torch_fused": "torch fused"}


def after_switch(root: Path) -> str:
  report = load(root, "after_switch")
  block = report["block"]
  positions = [position for position in (0, 1, 2, 3, 4, 5, 6, 8, block - 1)
               if position < block]
  positions = sorted(set(positions))
  rows = []
  for run in report["runs"]:
    pause = f"{run['pause_ms']:g} ms" + (" (busy)" if run.get("busy") else "")
    for name, per_step in run["median_ms_by_step"].items():
      rows.append([pause, AFTER_SWITCH_NAMES.get(name, name),
                   *(f"{per_step[position]:.2f}" for position in positions),
                   f"{run['cpu_ms_during_pause_after'][name]:.2f} ms"])
  lines = table(["sleep", "variant", *map(str, positions), "CPU in sleep"], rows)
  runs = (f"{report['params']:,} float32 params, blocks of {block} steps, medians of "
          f"{report['rounds']} blocks")
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


PROBLEM_NAMES = {
    "least_squares": "least squares",
    "least_squares_minibatch": "least squares, minibatch",
    "noisy_mlp": "noisy MLP",
    "two_layer": "two-layer net",
    "digits": "digits MLP",
}
CONTROL = "float32_jitter"
CONTROL_LABEL = "float32, params perturbed (sensitivity control)"


def variant_label(report: dict[str, Any], name: str, default: str) -> str:
  """A variant's description from the results, where they record one."""
  for source in ((report.get("meta") or {}).get("variants"), report.get("variants")):
    entry = (source or {}).get(name)
    if isinstance(entry, str) and entry:
      return entry
    if isinstance(entry, dict):
      for key in ("label", "description"):
        if entry.get(key):
          return str(entry[key])
  return default


def problems(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """The quality results by problem."""
  return report.get("quality") or report["results"]


def control_moved(report: dict[str, Any]) -> dict[str, float]:
  """The params' largest relative change under the control, by problem, where recorded."""
  moved = {}
  for source in (report.get("results") or {}, report.get("quality") or {}):
    for name, entry in source.items():
      if isinstance(entry, dict) and isinstance(entry.get("control_moved"), (int, float)):
        moved.setdefault(name, float(entry["control_moved"]))
  return moved


def state_precision(root: Path) -> str:
  report = load(root, "state_precision")
  results = problems(report)
  names = list(results)
  state_bytes = report["state_bytes_per_param"]
  step_time = report.get("step_time") or {}

  def times(variant: str) -> str:
    if variant not in step_time:
      return "\u2013"
    cells = []
    for call in ("", ".apply_step"):
      entry = step_time.get(variant + call)
      if entry is None:
        cells.append("\u2013")
        continue
      cell = f"{entry['median_ms']:.2f} ms"
      if variant != "float32":
        cell += f" ({entry['ratio_to_float32']:.2f}x)"
      cells.append(cell)
    return " / ".join(cells)

  def quality(variant: str, signed: bool, bold: bool) -> list[str]:
    cells = []
    for name in names:
      summary = results[name]["summary"][variant]
      cell = f"{summary['max_abs_relative_change'] * 100:.2f}%"
      if bold:
        cell = f"**{cell}**"
      if signed:
        cell += f" ({signed_percent(summary['mean_relative_change'])})"
      cells.append(cell)
    return cells

  rows = [["float32", f"{state_bytes['float32']:g}", times("float32"),
           "0 (reference)", *["0"] * (len(names) - 1)]]
  kinds = (
      ("bf16_cast", 'bfloat16, plain cast (`"nearest"`)', True, False),
      ("bf16_stochastic", "**bfloat16, stochastic rounding (default)**", True, True),
      ("bf16_weyl", "*prototype:* bfloat16, golden-ratio rounding across steps", False, False),
      ("bf16_kahan", "*prototype:* compensated bfloat16 pair per moment", False, False),
  )
  for variant, label, signed, bold in kinds:
    if variant not in state_bytes and variant not in results[names[0]]["summary"]:
      continue
    size = f"{state_bytes[variant]:g}"
    cells = [label, f"**{size}**" if bold else size, times(variant)]
    if bold and variant in step_time:
      cells[2] = f"**{cells[2]}**"
    rows.append(cells + quality(variant, signed, bold))
  if CONTROL in results[names[0]]["summary"]:
    rows.append([variant_label(report, CONTROL, CONTROL_LABEL), f"{state_bytes['float32']:g}",
                 "\u2013", *quality(CONTROL, False, False)])
  header = ["state", "bytes / param",
            f"step time, {short_count(step_time['size'])} params (CPU): "
            "`update` / `apply_step`" if "size" in step_time else "step time",
            *(PROBLEM_NAMES.get(name, name) for name in names)]
  lines = table(header, rows)
  moved = control_moved(report)
  if moved:
    lines += ["", "Sensitivity control: " + ", ".join(
        f"moved params by {moved[name]:.1e} ({PROBLEM_NAMES.get(name, name)})"
        for name in names if name in moved) + "."]
  seeds = sorted({len(results[name]["runs"]) for name in names})
  runs = f"{' or '.join(map(str, seeds))} seeds per problem"
  if "size" in step_time:
    runs += (f"; step time: one leaf of {step_time['size']:,} float32 params, medians of "
             f"{step_time['repeats']} interleaved runs")
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


OPEN_LOOP = {"gaussian": "Gaussian", "period_3": "repeating with period 3",
             "constant": "constant"}
OPEN_LOOP_VARIANTS = (("bf16_cast", "plain cast"), ("bf16_stochastic", "stochastic rounding"),
                      ("bf16_weyl", "golden-ratio across steps"))


def bias_percent(value: float) -> str:
  """A relative error as a signed percentage, with fewer digits as it grows."""
  size = abs(value) * 100
  digits = 0 if size >= 9.95 else 1 if size >= 0.995 else 2
  return signed_percent(value, digits)


def state_precision_open_loop(root: Path) -> str:
  report = load(root, "state_precision")
  bias = report["rounding_bias"]
  kinds = [name for name in bias if isinstance(bias[name], dict)]
  rows = [[OPEN_LOOP.get(kind, kind),
           *(bias_percent(bias[kind][variant]["nu_mean_relative_error"])
             for variant, _ in OPEN_LOOP_VARIANTS)]
          for kind in kinds]
  lines = table(["gradients", *(title for _, title in OPEN_LOOP_VARIANTS)], rows)
  stochastic = [(OPEN_LOOP.get(kind, kind), bias[kind]["bf16_stochastic"]) for kind in kinds]
  lines += [
      "",
      "Stochastic rounding, rms relative error of the stored `nu`: " + ", ".join(
          f"{entry['nu_rms_relative_error'] * 100:.1f}% ({kind})" for kind, entry in stochastic)
      + "; mean relative error of the stored `nu_max`: " + ", ".join(
          f"{bias_percent(entry['nu_max_mean_relative_error'])} ({kind})"
          for kind, entry in stochastic) + ".",
  ]
  runs = f"{bias['size']:,} coordinates, {bias['steps']} steps"
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


CHECKPOINT_NAMES = {"no_save": "none", "sync": "synchronous", "async": "asynchronous"}


def checkpoint_cost(root: Path) -> str:
  report = load(root, "checkpoint_cost")
  rows = []
  for name, entry in report["variants"].items():
    saves = "cost_per_save_ms" in entry
    rows.append([
        CHECKPOINT_NAMES.get(name, name), f"{entry['mean_step_ms']:.1f} ms",
        f"{entry['ratio_vs_no_save']:.2f}",
        f"{entry['cost_per_save_ms']:.0f} ms" if saves else "",
        f"{entry['median_saving_step_ms']:.0f} ms" if saves else "",
    ])
  lines = table(["saving", "mean step", "vs no saving", "per save", "the step that saves"],
                rows)
  config = report["config"]
  widths = "-".join(str(width) for width in config["widths"])
  runs = (f"a {widths} MLP, {config['params']:,} float32 params, batch {config['batch']}, "
          f"saving {config['saved_bytes'] / 1e6:.1f} MB of params and state every "
          f"{config['interval']} steps, "
          f"{max(entry['steps'] for entry in report['variants'].values())} steps per variant")
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


# What each parity case runs in its framework (the optax_amsgrad side is in
# tests/parity_cases.py).
PARITY_CASES = {
    "torch_adam": "`Adam(lr=1e-2, amsgrad=True)`",
    "torch_adam_hyperparameters": "`betas=(0.8, 0.99), eps=1e-6`",
    "torch_adam_coupled_l2": "`weight_decay=0.1`",
    "torch_adamw": "`AdamW(weight_decay=0.1, amsgrad=True)`",
    "torch_adam_complex": "complex128 params",
    "keras_adam": "`Adam(learning_rate=2**-7, epsilon=1e-7, amsgrad=True)`",
    "keras_adamw": "`AdamW(weight_decay=0.125, amsgrad=True)`",
    "optax_amsgrad": "`optax.amsgrad(1e-2)` vs `convention=\"optax\"`",
}
FRAMEWORK_LABELS = {"keras": "keras (JAX backend)"}


def parity(root: Path) -> str:
  report = load(root, "parity")
  versions = meta_of(report)["versions"]
  rows = []
  for case in report["cases"]:
    framework = case["framework"]
    label = FRAMEWORK_LABELS.get(framework, framework)
    if versions.get(framework):
      label = label.replace(framework, f"{framework} {versions[framework]}", 1)
    what = PARITY_CASES.get(case["name"])
    rows.append([
        f"`{case['name']}`" + (f": {what}" if what else ""), label,
        "not installed" if case["live"] is None else f"{case['live']:.1e}",
        f"{case['recorded']:.1e}",
    ])
  lines = table(["case", "framework", "live", "recorded"], rows)
  runs = "1,000 float64 steps per case, the largest relative difference over steps and params"
  return "\n".join(lines) + "\n\n" + provenance(report, runs)


def step_time_update_vs_fused(root: Path) -> str:
  """``update`` and ``apply_step`` against torch fused, over the one-leaf cases."""
  report = load(root, "step_time")
  cases = [case for case in report["cases"] if case["leaves"] == 1
           and "torch_fused" in case["variants"]]

  def ratios(variant: str) -> str:
    return ", ".join(f"{case['variants'][variant]['ratio_vs_torch_fused']:.2f}" for case in cases)

  sizes = ", ".join(short_count(case["params"]) for case in cases)
  return (f"Against PyTorch's fused `Adam(amsgrad=True)` over one leaf of {sizes} float32 "
          f"params, `apply_step` took {ratios('ours.apply_step')} times its step time and "
          f"`update` {ratios('ours')} times, in one interleaved run.\n\n"
          + step_time_provenance(report))



# The 8-bit state's rows: each problem's mean change of the final loss
# against float32 state, with its standard error over the seeds.
INT8_VARIANTS = (
    ("float32_jitter", "float32, params perturbed (control)"),
    ("bf16_stochastic", "bfloat16, stochastic"),
    ("int8", "int8, the defaults (leaves under 4,096 elements in float32)"),
    ("int8_all", "int8, every leaf"),
    ("int8_all_up", "int8, `nu_max` rounded up"),
    ("int8_nearest_all", "int8, round to nearest under a fresh scale"),
)


def state_precision_int8(root: Path) -> str:
  report = load(root, "state_precision_int8")
  results = problems(report)
  names = list(results)
  header = ["state", *(name.replace("_", " ") for name in names)]
  rows = []
  for variant, label in INT8_VARIANTS:
    cells = []
    for name in names:
      summary = results[name]["summary"].get(variant)
      cells.append("\u2013" if summary is None else
                   f"{signed_percent(summary['mean_relative_change'])} "
                   f"\u00b1 {summary['standard_error'] * 100:.2f}%")
    rows.append([label, *cells])
  seeds = {len(entry["runs"]) for entry in results.values()}
  state_bytes = report["state_bytes_per_param"]
  bytes_line = ", ".join(f"{name.replace('_stochastic', '')} {value:.2f}"
                         for name, value in state_bytes.items())
  return "\n".join([
      *table(header, rows), "",
      f"State bytes per parameter (`nbytes`): {bytes_line}.", "",
      provenance(report, f"mean change of the final loss against float32 state "
                         f"\u00b1 its standard error over {', '.join(map(str, sorted(seeds)))} "
                         f"data orders"),
  ])


def compile_time_int8(root: Path) -> str:
  report = load(root, "compile_time_int8")
  first = report["first_call"]
  step = report["step_time"]
  sizes = report["state_bytes"]
  reference = step["variants"]["optax.amsgrad"]
  ours = step["variants"]["ours_int8"]
  model = sizes["solvers"]["ours_int8"]

  def first_calls(call: str) -> list[str]:
    suffix = "" if call == "update" else ".apply_step"
    ref = first["variants"][REFERENCE + suffix]["median"]["first_call_s"]
    cells = [f"{ref:.1f} s"]
    for path in ("xla", "kernel"):
      variant = first["variants"].get(f"ours_int8{suffix}/{path}")
      seconds = variant["median"]["first_call_s"] if variant else None
      cells += [f"{seconds:.1f} s", f"{seconds / ref:.2f}x"] if seconds else ["", ""]
    return [f"first call, {first['leaves']} leaves of {first['leaf_size']:,}, `{call}`",
            *cells]

  rows = [
      ["step time, one leaf of " + short_count(step["params"]) + " params",
       f"{reference['median_ms']:.1f} ms", f"{ours['median_ms']:.1f} ms",
       f"{ours['ratio_vs_optax.amsgrad']:.2f}x", "(below)", ""],
      first_calls("update"),
      *([first_calls("apply_step")] if "ours_int8.apply_step/xla" in first["variants"] else []),
      ["temporaries of the donated step, in float32 copies of the params",
       f"{reference['temp_float32_params']:.2f}", f"{ours['temp_float32_params']:.2f}", "",
       "", ""],
      [f"state bytes per param, a model of {short_count(sizes['params'])} params",
       f"{sizes['solvers']['optax.amsgrad']['bytes_per_param']:.2f}",
       f"{model['bytes_per_param']:.2f}", "", "", ""],
  ]
  return "\n".join([
      *table(["", "optax.amsgrad", "int8 state, XLA path", "ratio", "int8 state, CPU kernel",
              "ratio"], rows), "",
      f"{len(model['float32_leaves'])} of the model's {sizes['leaves']} leaves keep "
      "float32 state (under 4,096 elements or rows under 32). The `apply_step` rows "
      "compare with `optax.amsgrad`'s `update` and `apply_updates` in one jitted step, "
      "the same call there.", "",
      provenance(report, "medians"),
  ])


INT8_KERNEL_ROWS = (
    ("float32.kernel", "float32 state, CPU kernel, `apply_step`"),
    ("int8.kernel", "int8 state, CPU kernel, `apply_step`"),
    ("int8.kernel.update", "int8 state, CPU kernel, `update` and `apply_updates`"),
    ("int8.xla", "int8 state, XLA path, `apply_step`"),
    ("optax.amsgrad", "`optax.amsgrad`, float32 state"),
)


def int8_kernel(root: Path) -> str:
  """The CPU kernel's 8-bit step against its float32 step and Optax's."""
  report = load(root, "int8_kernel")
  results = report["variants"]
  rows = [[label, f"{results[name]['median_ms']:.1f} ms",
           f"{results[name]['ratio_to_float32.kernel']:.2f}x",
           f"{results[name]['ratio_to_optax.amsgrad']:.2f}x",
           f"{results[name]['state_bytes_per_param']:.2f}",
           f"{results[name].get('temp_in_float32_copies', float('nan')):.2f}",
           # XLA's cost model does not see inside the kernel's custom call.
           "-" if results[name]["on_kernel"]
           else f"{results[name]['bytes_accessed_per_param']:.1f}"]
          for name, label in INT8_KERNEL_ROWS]
  return "\n".join([
      *table([f"one leaf of {short_count(report['meta']['params'])} params", "step",
              "/ float32 kernel", "/ optax.amsgrad", "state bytes per param",
              "temporaries (float32 copies)", "bytes accessed per param (XLA's cost model)"],
             rows), "",
      f"Streaming bandwidth in the same run (`a + s * b`): "
      f"{results['floor']['bandwidth_gb_s']:.1f} GB/s. The bytes accessed are "
      "what XLA's cost model counts for the compiled CPU step, reads and writes "
      "of every fusion; it does not count inside the kernel's call (-).", "",
      provenance(report, "medians of interleaved steps"),
  ])


PEER_VARIANTS = (
    ("float32_jitter", "float32 `AdamW`, params perturbed (control)"),
    ("torchao_float32", "torchao's step with float32 state"),
    ("adamw8bit", "torchao `AdamW8bit`"),
)


def int8_peers(root: Path) -> str:
  """torchao's 8-bit AdamW against float32 AdamW, as the 8-bit rows above."""
  report = load(root, "int8_peers")
  results = report["quality"]
  names = list(results)
  rows = []
  for variant, label in PEER_VARIANTS:
    cells = []
    for name in names:
      summary = results[name]["summary"][variant]
      cells.append(f"{signed_percent(summary['mean_relative_change'])} "
                   f"\u00b1 {summary['standard_error'] * 100:.2f}%")
    rows.append([label, *cells])
  state = [results[name]["state"]["adamw8bit"] for name in names]
  rows.append(["`AdamW8bit`: params in 8 bits; state bytes per param",
               *(f"{s['params_8bit']:,} of {s['params']:,}; {s['state_bytes_per_param']:.2f}"
                 for s in state)])
  seeds = {len(entry["runs"]) for entry in results.values()}
  raised = report["amsgrad_true"]
  return "\n".join([
      *table(["PyTorch", *(name.replace("_", " ") for name in names)], rows), "",
      f"`AdamW8bit(amsgrad=True)` raises `{raised['type']}` on its first step "
      f"(caused by `{raised['cause'].split(', types=')[0]}`)." if raised.get("raised")
      else "`AdamW8bit(amsgrad=True)` ran.", "",
      provenance(report, f"mean change of the final loss against float32 `AdamW` "
                         f"\u00b1 its standard error over {', '.join(map(str, sorted(seeds)))} "
                         f"data orders"),
  ])


RENDERERS: dict[str, Callable[[Path], str]] = {
    "compile_time": compile_both,
    "compile_time.first_call": compile_first_call,
    "compile_time.step_time": compile_step_time,
    "step_time.vs_torch_fused": step_time_vs_torch_fused,
    "step_time.limit_first_call": step_time_limit_first_call,
    "step_time.one_pass": step_time_one_pass,
    "step_time.vs_optax": step_time_vs_optax,
    "step_time.vs_torch_and_limit": step_time_vs_torch_and_limit,
    "step_time.compiled": step_time_compiled,
    "step_time.first_call": step_time_first_call,
    "step_time_steady": step_time_steady,
    "after_switch": after_switch,
    "state_precision": state_precision,
    "state_precision.open_loop": state_precision_open_loop,
    "checkpoint_cost": checkpoint_cost,
    "parity": parity,
    "step_time.update_vs_fused": step_time_update_vs_fused,
    "state_precision_int8": state_precision_int8,
    "compile_time_int8": compile_time_int8,
    "int8_peers": int8_peers,
    "int8_kernel": int8_kernel,
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
  for relative in documents(args.root):
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
