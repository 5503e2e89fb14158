"""The benchmarks run end to end at small sizes (the step-time benchmark in
its quick mode), so that they cannot rot. Nothing here looks at the timings
themselves."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time.py"


def run_benchmark(script: Path, out: Path, *args: str, timeout: int = 600) -> dict:
  """Runs a benchmark script writing to ``out`` and returns its JSON. A fresh
  process: the test session enables float64, the benchmarks measure what
  users get by default."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  result = subprocess.run(
      [sys.executable, str(script), *args, "--out", str(out)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, Path]:
  out = tmp_path_factory.mktemp("bench") / "step_time_quick.json"
  return run_benchmark(SCRIPT, out, "--quick"), out


def test_quick_mode_writes_every_section(quick_report):
  report, _ = quick_report
  assert set(report) == {"meta", "cases", "compile"}
  meta = report["meta"]
  for key in ("jax_platform", "jax_device", "torch_threads", "torch_device", "command",
              "commit", "time", "quick", "rounds", "steps_per_block"):
    assert key in meta
  assert {"cpu", "cpu_flags", "cpu_threads", "load_average_start",
          "load_average_end"} <= set(meta["machine"])
  assert {"python", "jax", "jaxlib", "optax"} <= set(meta["versions"])
  assert meta["quick"] is True
  assert len(report["cases"]) >= 2
  for case in report["cases"]:
    assert {"name", "leaves", "leaf_size", "params", "bandwidth_GBps",
            "limit_ms", "variants"} <= set(case)
    variants = case["variants"]
    expected = {"floor", "ours", "ours_flat", "optax.amsgrad",
                "optax.amsgrad_no_donation", "optax.adam"}
    try:
      import torch  # noqa: F401
    except ImportError:
      pass
    else:
      expected |= {"torch_fused", "torch_foreach"}
    assert expected <= set(variants)
    for name, entry in variants.items():
      assert {"median_ms", "q1_ms", "q3_ms", "samples"} <= set(entry), name
      assert entry["samples"] > 0
      assert "ratio_vs_optax.amsgrad" in entry
      if name != "floor":
        assert {"fraction_of_limit", "achieved_GBps", "min_bytes_per_param"} <= set(entry)
    for name in ("ours", "ours_flat", "optax.amsgrad", "optax.adam"):
      assert {"compile_s", "temp_bytes", "state_bytes", "temp_fraction_of_state",
              "bytes_accessed_per_param", "fusions"} <= set(variants[name])
  leaves = {row["leaves"] for row in report["compile"]}
  assert len(leaves) >= 3
  for row in report["compile"]:
    assert {"variant", "leaves", "leaf_size", "trace_s", "lower_s", "compile_s",
            "total_s", "fusions"} <= set(row)


def test_donated_step_needs_no_full_size_temporaries(quick_report):
  # memory_analysis is deterministic, unlike the timings: with params and
  # state donated the step updates them in place.
  report, _ = quick_report
  for case in report["cases"]:
    assert case["variants"]["ours"]["temp_fraction_of_state"] < 0.01, case["name"]


def test_plot_is_written_when_matplotlib_is_installed(quick_report):
  pytest.importorskip("matplotlib")
  _, out = quick_report
  assert out.with_suffix(".png").stat().st_size > 0


def test_after_switch_runs_and_reports_every_step(tmp_path):
  report = run_benchmark(
      ROOT / "benchmarks" / "after_switch.py", tmp_path / "after_switch.json",
      "--params", "5000", "--rounds", "2", "--block", "3", "--pauses-ms", "0", "1",
      timeout=300,
  )
  assert {"commit", "machine", "versions"} <= set(report["meta"])
  assert "cpu_flags" in report["meta"]["machine"]
  assert [run["pause_ms"] for run in report["runs"]] == [0.0, 1.0]
  for run in report["runs"]:
    assert "apply_step" in run["median_ms_by_step"]
    for name, per_step in run["median_ms_by_step"].items():
      assert len(per_step) == 3, name
      assert all(t > 0 for t in per_step), name
      assert run["cpu_ms_during_pause_after"][name] >= 0, name


def test_checkpoint_cost_runs_every_variant(tmp_path):
  report = run_benchmark(ROOT / "benchmarks" / "checkpoint_cost.py",
                         tmp_path / "checkpoint_cost.json", "--quick", timeout=300)
  assert {"commit", "machine", "versions"} <= set(report["meta"])
  assert set(report["variants"]) == {"no_save", "sync", "async"}
  for name, entry in report["variants"].items():
    assert entry["steps"] > 0 and entry["mean_step_ms"] > 0, name
    assert entry["saves"] == (0 if name == "no_save" else report["config"]["rounds"]), name


def test_int8_kernel_runs_every_variant(tmp_path):
  report = run_benchmark(ROOT / "benchmarks" / "int8_kernel.py", tmp_path / "int8_kernel.json",
                         "--quick", "--params", "20000", "--rounds", "2", timeout=300)
  assert {"commit", "machine", "versions"} <= set(report["meta"])
  variants = report["variants"]
  assert set(variants) == {"floor", "float32.kernel", "int8.kernel", "int8.kernel.update",
                           "int8.xla", "optax.amsgrad"}
  assert [name for name, v in variants.items() if v.get("on_kernel")] == [
      "float32.kernel", "int8.kernel", "int8.kernel.update"]
  for name, entry in variants.items():
    assert entry["median_ms"] > 0, name
  # 8-bit state: codes, and a scale per 256 elements.
  assert 3.0 < variants["int8.kernel"]["state_bytes_per_param"] < 3.1
  # (and the step count, 4 bytes in all)
  assert variants["float32.kernel"]["state_bytes_per_param"] == pytest.approx(12, abs=1e-3)


COMPILE_TIME = ROOT / "benchmarks" / "compile_time.py"
RENDER = ROOT / "benchmarks" / "render.py"


def benchmark_module(name: str) -> ModuleType:
  """``benchmarks/NAME.py`` imported under a name of its own (the folder is no package)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                ROOT / "benchmarks" / f"{name}.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_provenance_records_this_checkout_machine_and_versions():
  machine = benchmark_module("machine")
  meta = machine.provenance("python benchmarks/x.py --quick",
                            packages=("jax", "optax", "no-such-package-here"), quick=True)
  head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True, cwd=ROOT).stdout.strip()
  assert meta["commit"] == head
  assert isinstance(meta["dirty"], bool)
  assert meta["command"] == "python benchmarks/x.py --quick"
  assert meta["quick"] is True
  assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", meta["time"])
  assert isinstance(meta["machine"]["cpu"], str) and meta["machine"]["cpu"]
  flags = meta["machine"]["cpu_flags"]
  assert isinstance(flags, list) and set(flags) <= set(machine.SIMD_FLAGS)
  assert meta["machine"]["cpu_threads"] >= 1
  # Only what is installed, each at its installed version.
  assert meta["versions"] == {
      "python": platform.python_version(),
      "jax": importlib.metadata.version("jax"),
      "optax": importlib.metadata.version("optax"),
  }


def test_render_provenance_line_names_commit_and_cpu_flags():
  render = benchmark_module("render")
  commit = "0123456789abcdef0123456789abcdef01234567"
  meta = {
      "command": "python benchmarks/step_time.py", "time": "2030-01-02 03:04:05 UTC",
      "commit": commit, "dirty": False, "changed_paths": [],
      "machine": {"platform": "Linux", "cpu": "Some CPU", "cpu_count": 8, "cpu_threads": 4,
                  "cpu_flags": ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16"],
                  "load_average_start": [0.5, 0.4, 0.3], "load_average_end": [0.7, 0.5, 0.3]},
      "versions": {"python": "3.11.7", "jax": "0.10.2", "jaxlib": "0.10.2", "optax": "0.2.8",
                   "torch": "2.13.0"},
  }
  line = render.provenance({"meta": meta}, "3 runs")
  assert line == (
      "*`python benchmarks/step_time.py`, 3 runs; commit `0123456789`, 2030-01-02; Some CPU "
      "with avx512f, avx512_bf16, 4 threads of 8 CPUs, load average 0.50 at the start and "
      "0.70 at the end; jax 0.10.2, jaxlib 0.10.2, optax 0.2.8, torch 2.13.0.*")
  meta["machine"]["cpu_flags"] = ["avx", "avx2", "fma"]
  meta["dirty"], meta["changed_paths"] = True, [" M optax_amsgrad/_math.py"]
  line = render.provenance({"meta": meta}, "3 runs")
  assert "commit `0123456789` with uncommitted changes, 2030-01-02" in line
  assert "Some CPU with avx2, 4 threads" in line
  # A result from before the common form still renders, without a commit.
  legacy = {"command": "python benchmarks/after_switch.py", "jax": "0.10.2", "runs": []}
  assert render.provenance(legacy, "3 runs") == (
      "*`python benchmarks/after_switch.py`, 3 runs; unknown commit; jax 0.10.2.*")


@pytest.fixture(scope="module")
def compile_time_report(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("bench") / "compile_time_quick.json"
  return run_benchmark(COMPILE_TIME, out, "--quick")


def test_compile_time_quick_mode_writes_every_section(compile_time_report):
  report = compile_time_report
  assert set(report) == {"meta", "first_call", "step_time"}
  meta = report["meta"]
  assert {"command", "commit", "dirty", "machine", "versions", "quick"} <= set(meta)
  assert meta["quick"] is True
  assert {"platform", "cpu", "cpu_flags", "cpu_count", "cpu_threads", "load_average_start",
          "load_average_end"} <= set(meta["machine"])
  assert {"python", "jax", "jaxlib", "optax", "numpy"} <= set(meta["versions"])

  first_call = report["first_call"]
  expected = {"optax.amsgrad", "optax.amsgrad.apply_step"}
  for solver in ("ours", "ours_bf16"):
    for call in ("", ".apply_step"):
      expected |= {f"{solver}{call}/xla", f"{solver}{call}/kernel"}
  assert set(first_call["variants"]) == expected
  for name, entry in first_call["variants"].items():
    assert entry["processes"] == len(entry["runs"]) >= 1, name
    assert set(entry["ratio_vs_optax.amsgrad"]) == {"first_call_s", "aot_s"}, name
    assert isinstance(entry["median"]["compiles_min"], int), name
    assert isinstance(entry["median"]["compiles_max"], int), name
    for run in entry["runs"]:
      assert {"first_call_s", "later_calls_s", "trace_s", "lower_s", "compile_s",
              "aot_s", "state_dtypes"} <= set(run), name
      assert isinstance(run["compiles"], int) and run["compiles"] >= 1, name
      assert len(run["later_calls_s"]) == first_call["loop_steps"] - 1, name
      # Each variant ran with the kernel switch it names.
      assert run["kernel_switch"] == ("0" if name.endswith("/xla") else None), name
      assert run["state_dtypes"] == (["bfloat16"] if "bf16" in name else ["float32"]), name

  step_time = report["step_time"]
  assert step_time["kernel_switch"] == "0"
  assert set(step_time["variants"]) == {"floor", "optax.amsgrad", "ours", "ours_bf16"}
  for name, entry in step_time["variants"].items():
    assert entry["samples"] == len(entry["samples_ms"]) > 0, name
    assert {"median_ms", "q1_ms", "q3_ms", "ratio_vs_optax.amsgrad"} <= set(entry), name
    if name != "floor":
      assert {"fraction_of_limit", "min_bytes_per_param", "state_dtypes"} <= set(entry), name


def run_render(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, str(RENDER), *args], capture_output=True, text=True, cwd=ROOT,
      timeout=120,
  )


def test_render_check_passes_on_the_committed_files():
  result = run_render("--check")
  assert result.returncode == 0, result.stdout + result.stderr


def copy_rendered_files(root: Path) -> None:
  """The READMEs, the site's pages and the stored results, copied under ``root``."""
  results = [path.relative_to(ROOT).as_posix()
             for path in (ROOT / "benchmarks" / "results").glob("*.json")]
  pages = [path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("guides/*.md")]
  for relative in ("README.md", "benchmarks/README.md", *pages, *results):
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_text((ROOT / relative).read_text())


def edit_block(path: Path, name: str, old: str, new: str) -> str:
  """Replaces ``old`` by ``new`` inside block ``name`` of ``path``; the text before."""
  text = path.read_text()
  start = text.index(f"<!-- render:{name} -->")
  end = text.index(f"<!-- /render:{name} -->")
  assert old in text[start:end], name
  path.write_text(text[:start] + text[start:end].replace(old, new, 1) + text[end:])
  return text


@pytest.mark.parametrize(("relative", "name", "old", "new"), [
    # optax.amsgrad's ratio to itself is always 1.00.
    ("benchmarks/README.md", "compile_time.step_time", "| 1.00 |", "| 0.90 |"),
    ("benchmarks/README.md", "step_time.vs_optax", "| 1.00 |", "| 0.90 |"),
    ("benchmarks/README.md", "after_switch", "| 3 ms |", "| 4 ms |"),
    ("docs/guides/state_precision.md", "state_precision", "| float32 | 12 |",
     "| float32 | 16 |"),
    ("docs/guides/checkpoints.md", "checkpoint_cost", "| none |", "| off |"),
    ("docs/guides/conventions.md", "parity", "| optax 0.2.8 |", "| optax 0.2.7 |"),
])
def test_render_check_names_a_block_edited_by_hand(tmp_path, relative, name, old, new):
  copy_rendered_files(tmp_path)
  assert run_render("--check", "--root", str(tmp_path)).returncode == 0

  readme = tmp_path / relative
  text = edit_block(readme, name, old, new)
  result = run_render("--check", "--root", str(tmp_path))
  assert result.returncode == 1
  assert f"{relative}: block {name} differs" in result.stderr
  assert set(re.findall(r"block (\S+) differs", result.stderr)) == {name}

  # Rendering restores the block and leaves the rest of the file alone.
  assert run_render("--root", str(tmp_path)).returncode == 0
  assert readme.read_text() == text
  assert run_render("--check", "--root", str(tmp_path)).returncode == 0


def test_render_check_fails_when_the_stored_results_change(tmp_path):
  copy_rendered_files(tmp_path)
  path = tmp_path / "benchmarks" / "results" / "checkpoint_cost.json"
  report = json.loads(path.read_text())
  report["variants"]["sync"]["mean_step_ms"] += 1.0
  path.write_text(json.dumps(report))
  result = run_render("--check", "--root", str(tmp_path))
  assert result.returncode == 1
  assert "docs/guides/checkpoints.md: block checkpoint_cost differs" in result.stderr


def test_state_precision_control_row_reads_its_label_and_movement_from_the_results(tmp_path):
  copy_rendered_files(tmp_path)
  readme = tmp_path / "docs" / "guides" / "state_precision.md"
  text = readme.read_text()
  assert "float32, params perturbed (sensitivity control)" in text
  assert "moved params by 3.1e-04" not in text

  path = tmp_path / "benchmarks" / "results" / "state_precision.json"
  report = json.loads(path.read_text())
  report.setdefault("meta", {})["variants"] = {
      "float32_jitter": {"description": "float32, params scaled by 1 + 1e-6"}}
  for index, entry in enumerate(report["quality"].values()):
    entry["control_moved"] = 3.1e-4 * (index + 1)
  path.write_text(json.dumps(report))
  assert run_render("--check", "--root", str(tmp_path)).returncode == 1
  assert run_render("--root", str(tmp_path)).returncode == 0
  rendered = readme.read_text()
  assert "| float32, params scaled by 1 + 1e-6 | 12 |" in rendered
  assert "moved params by 3.1e-04 (least squares)" in rendered
  assert "moved params by 6.2e-04 (least squares, minibatch)" in rendered
  assert run_render("--check", "--root", str(tmp_path)).returncode == 0
