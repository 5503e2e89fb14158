"""Test configuration: float64 is enabled so that parity can be checked to
round-off; float32 and narrower dtypes are always requested explicitly."""

import jax

jax.config.update("jax_enable_x64", True)

import os  # noqa: E402

# Keras parity runs Keras 3 on the JAX backend; it must be chosen before
# keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "jax")
