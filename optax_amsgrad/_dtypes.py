"""The dtype facts every module asks: a dtype's limits and its real part."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def finfo(dtype: Any) -> Any:
  """``jnp.finfo``, which knows bfloat16 (NumPy's does not); the real
  part's for complex dtypes."""
  return jnp.finfo(dtype)  # type: ignore[no-untyped-call]


def real_dtype(dtype: Any) -> np.dtype:
  """float32 for complex64 (float64 for complex128), the dtype itself for
  real floating dtypes, bfloat16 included."""
  resolved: np.dtype = finfo(dtype).dtype
  return resolved
