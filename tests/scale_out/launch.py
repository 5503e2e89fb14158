"""Starting the scale-out scripts in processes of their own, with a time limit.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, and
the test session has already started JAX on one device with float64 enabled:
the multi-device and multi-process checks therefore run in fresh interpreters.
Whatever happens (success, a failing process, a time-out, an interrupted test)
every process started here is killed and reaped before control returns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent

Job = tuple[str, Sequence[str]]  # (script in tests/scale_out, arguments)


def script_env(*, host_devices: int) -> dict[str, str]:
  """A script's environment: CPU only, ``host_devices`` devices, JAX's default
  float32, and the repository, the tests and this folder importable."""
  env = dict(os.environ)
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={host_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPOSITORY), str(HERE.parent), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
  )
  return env


def kill(process: subprocess.Popen[bytes]) -> None:
  """Kills the process and its process group if still running, then reaps it."""
  if process.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
  with contextlib.suppress(subprocess.TimeoutExpired):
    process.wait(timeout=30)


@contextlib.contextmanager
def started(
    jobs: Sequence[Job], *, host_devices: int = 1
) -> Iterator[list[tuple[subprocess.Popen[bytes], IO[bytes]]]]:
  """Starts every job, each in a new session (so its children die with it) and
  writing to a temporary file (a full pipe cannot block it); on leaving, kills
  whatever still runs."""
  running: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
  try:
    for script, args in jobs:
      output = tempfile.TemporaryFile()
      running.append((
          subprocess.Popen(
              [sys.executable, str(HERE / script), *args],
              env=script_env(host_devices=host_devices),
              stdout=output,
              stderr=subprocess.STDOUT,
              start_new_session=True,
          ),
          output,
      ))
    yield running
  finally:
    for process, _ in running:
      kill(process)
    for _, output in running:
      output.close()


def _text(output: IO[bytes]) -> str:
  output.seek(0)
  return output.read().decode(errors="replace")


def run_together(
    jobs: Sequence[Job],
    *,
    timeout: float,
    host_devices: int = 1,
    pids: list[int] | None = None,
) -> list[str]:
  """Runs the jobs side by side and returns their outputs.

  Raises AssertionError, with the outputs, as soon as one job exits with an
  error (the others are killed at once) or when ``timeout`` seconds pass with
  some still running (all are killed). ``pids``, if given, receives the
  process ids, so that a test can check nothing outlives the call.
  """
  with started(jobs, host_devices=host_devices) as running:
    if pids is not None:
      pids.extend(process.pid for process, _ in running)
    deadline = time.monotonic() + timeout
    failure = None
    while failure is None:
      codes = [process.poll() for process, _ in running]
      if all(code == 0 for code in codes):
        return [_text(output) for _, output in running]
      if any(code not in (None, 0) for code in codes):
        failure = "exited with " + ", ".join(map(str, codes))
      elif time.monotonic() > deadline:
        failure = f"still running after {timeout} s (exit codes {codes})"
      else:
        time.sleep(0.05)
    for process, _ in running:
      kill(process)
    report = "\n".join(
        f"--- {script} {' '.join(args)} (exit {process.returncode}):\n"
        f"{_text(output)[-4000:]}"
        for (script, args), (process, output) in zip(jobs, running, strict=True)
    )
    raise AssertionError(f"{len(jobs)} process(es) {failure}.\n{report}")


def run_script(
    script: str, args: Sequence[str], *, host_devices: int, timeout: float
) -> str:
  """Runs one script to completion and returns its output."""
  return run_together([(script, args)], timeout=timeout, host_devices=host_devices)[0]


def run_or_kill(
    script: Path, args: Sequence[str], log: Path, *, timeout: float,
    kill_after: str | None = None, delay: float = 0.0,
) -> bool:
  """Runs ``script`` on one device, its output in ``log``, to its end, or
  SIGKILLs it ``delay`` seconds after it prints the line ``kill_after``.
  Returns whether it was killed running."""
  with open(log, "wb") as output:
    process = subprocess.Popen(
        [sys.executable, str(script), *args], env=script_env(host_devices=1),
        stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
    )
  try:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
      if kill_after is not None and f"\n{kill_after}\n" in "\n" + log.read_text():
        time.sleep(delay)
        if process.poll() is not None:
          break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
      time.sleep(0.002)
    if process.poll() is None:
      raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-3000:]}")
    assert process.returncode == 0, log.read_text()[-3000:]
    return False
  finally:
    kill(process)


def printed(log: Path, word: str) -> list[int]:
  """The numbers of the lines ``<word> <n>`` in ``log``."""
  return [int(n) for n in re.findall(rf"^{word} (\d+)$", log.read_text(), re.M)]


def load_example(name: str) -> ModuleType:
  """Imports ``examples/<name>.py`` as a module (``examples`` is no package)."""
  path = REPOSITORY / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
