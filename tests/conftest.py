"""Test configuration.

JAX runs in two modes: the default 32-bit one, which almost every user runs
(``jnp.ones(3)`` is float32, the step count int32, Python scalars weakly
typed float32), and float64 (``jax_enable_x64``), in which parity is checked
to round-off. The session runs with float64 on; a test module that says
``pytestmark = pytest.mark.both_modes`` runs each of its tests in both modes
(ids ``[x64]`` and ``[x32]``), except those marked ``x64_only``, which need
float64 arithmetic (comparisons to a float64 reference at 1e-12).

In CI (``CI=true``) a test skipped for a missing dependency fails the run:
a run without one of the extras must not pass with fewer tests unseen.
"""

import jax

jax.config.update("jax_enable_x64", True)

import os  # noqa: E402

# Keras parity runs Keras 3 on the JAX backend; it must be chosen before
# keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest  # noqa: E402
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

MODES = ("x64", "x32")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
  if metafunc.definition.get_closest_marker("both_modes") is None:
    return
  modes = ["x64"] if metafunc.definition.get_closest_marker("x64_only") else list(MODES)
  metafunc.fixturenames.append("jax_mode")
  metafunc.parametrize("jax_mode", modes, ids=modes)


@pytest.fixture(autouse=True)
def _jax_mode(request: pytest.FixtureRequest):
  """Sets the JAX mode of a ``both_modes`` test for its duration."""
  callspec = getattr(request.node, "callspec", None)
  mode = callspec.params.get("jax_mode") if callspec is not None else None
  if mode is None:
    yield
    return
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", mode == "x64")
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def jax_mode(request: pytest.FixtureRequest) -> str:
  """``"x64"`` or ``"x32"``: the mode a ``both_modes`` test runs in."""
  return str(request.param)


# Skips that say something the suite needs is missing (``importorskip``'s
# "could not import", a kernel that "was not built"): in CI they fail the run.
_MISSING = ("could not import", "was not built", "is not installed")


def _hide_nothing(report: pytest.CollectReport | pytest.TestReport) -> None:
  if os.environ.get("CI", "").lower() != "true" or not report.skipped:
    return
  reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(
      report.longrepr)
  if any(phrase in reason.lower() for phrase in _MISSING):
    report.outcome = "failed"
    report.longrepr = f"skipped in CI for something missing: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
  outcome = yield
  _hide_nothing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
  outcome = yield
  _hide_nothing(outcome.get_result())
