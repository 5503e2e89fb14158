"""Test configuration: float64 is enabled so that parity can be checked to
round-off; float32 and narrower dtypes are always requested explicitly."""

import jax

jax.config.update("jax_enable_x64", True)
