"""Choosing between the CPU handlers and the XLA path in tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from optax_amsgrad import _cpu_kernel


@contextlib.contextmanager
def xla_path() -> Iterator[None]:
  """Every leaf takes the XLA path (what other platforms run) while tracing
  inside this block. jit caches traces per function: trace a fresh one."""
  supports = _cpu_kernel.supports
  _cpu_kernel.supports = lambda *dtypes: False
  try:
    yield
  finally:
    _cpu_kernel.supports = supports
