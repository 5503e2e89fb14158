"""Choosing between the CPU handlers and the XLA path in tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SWITCH = "OPTAX_AMSGRAD_CPU_KERNEL"


@contextlib.contextmanager
def xla_path() -> Iterator[None]:
  """Every leaf takes the XLA path (what other platforms run) while tracing
  inside this block, through the switch users have
  (``OPTAX_AMSGRAD_CPU_KERNEL=0``). jit caches traces per function: trace a
  fresh one."""
  before = os.environ.get(SWITCH)
  os.environ[SWITCH] = "0"
  try:
    yield
  finally:
    if before is None:
      del os.environ[SWITCH]
    else:
      os.environ[SWITCH] = before
