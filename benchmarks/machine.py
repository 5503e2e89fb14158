"""Where a benchmark ran: the facts every stored result records with its
figures (the commit, the processor, the load, the versions)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

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
