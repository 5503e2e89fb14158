"""Where a benchmark ran: the facts every stored result records with its
figures (the commit, the processor, the load, the versions), gathered by
``provenance`` into the ``meta`` that every result file starts with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def git(*args: str) -> str | None:
  """The output of ``git ARGS`` in this checkout; None outside one."""
  try:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=HERE
    ).stdout
  except (OSError, subprocess.CalledProcessError):
    return None


def version(package: str) -> str | None:
  """The installed version of ``package``; None when it is not installed."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_threads() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not on Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:  # pragma: no cover - not on Linux
    pass
  return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:  # pragma: no cover - not available
    return None


# The SIMD extensions that set how fast a streaming kernel (an optimizer step,
# ``a + s * b``) can go, in the order the provenance lists them.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_bf16")
# The packages every benchmark records; scripts add their own (torch, orbax).
CORE_PACKAGES = ("jax", "jaxlib", "optax", "numpy", "optax_amsgrad")


def cpu_flags() -> list[str]:
  """The ``SIMD_FLAGS`` this processor has, from ``/proc/cpuinfo``; [] elsewhere."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        present = set(line.split(":", 1)[1].split())
        return [flag for flag in SIMD_FLAGS if flag in present]
  except OSError:  # pragma: no cover - not on Linux
    pass
  return []


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
  """``python benchmarks/SCRIPT ARGS``, the command that reruns this run.

  Args:
    script: the script's file name, e.g. ``"step_time.py"``.
    argv: the arguments ``main`` was given; None for ``sys.argv[1:]``.
  """
  return " ".join([f"python benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def provenance(
    command: str, *, packages: Sequence[str], quick: bool | None = None
) -> dict[str, Any]:
  """The ``meta`` every stored result starts with: what ran, where and when.

  Args:
    command: the command line that reruns the benchmark.
    packages: the packages whose versions the figures depend on; those not
      installed are left out.
    quick: whether this was a ``--quick`` smoke run; recorded when given.

  Returns:
    ``command``, ``time`` (UTC), ``commit``, ``dirty``, ``changed_paths``,
    ``machine`` (platform, cpu, cpu_flags, cpu_count, cpu_threads,
    load_average_start), ``versions`` (python and ``packages``) and, when
    given, ``quick``. Callers add their own fields, such as
    ``machine["load_average_end"]``.
  """
  head = git("rev-parse", "HEAD")
  status = git("status", "--porcelain")
  meta: dict[str, Any] = {
      "command": command,
      "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "commit": None if head is None else head.strip(),
      "dirty": None if status is None else bool(status.strip()),
      "changed_paths": None if status is None else status.splitlines()[:50],
      "machine": {
          "platform": platform.platform(),
          "cpu": cpu_model(),
          "cpu_flags": cpu_flags(),
          "cpu_count": os.cpu_count(),
          "cpu_threads": cpu_threads(),
          # Other processes competing for the cores make every figure noisy.
          "load_average_start": load_average(),
      },
      "versions": {"python": platform.python_version()},
  }
  for package in packages:
    installed = version(package)
    if installed is not None:
      meta["versions"][package] = installed
  if quick is not None:
    meta["quick"] = quick
  return meta
