"""Test configuration: float64 is enabled so that parity can be checked to
round-off; float32 and narrower dtypes are always requested explicitly."""

import jax

jax.config.update("jax_enable_x64", True)

import os  # noqa: E402

# Keras parity runs Keras 3 on the JAX backend; it must be chosen before
# keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests: "ci" is reproducible (a fixed seed derived from each test,
# no example database) and sized for CI; HYPOTHESIS_PROFILE=thorough searches
# longer with fresh random seeds.
settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
