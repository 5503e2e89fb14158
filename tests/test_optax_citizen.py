"""What a jitted Optax training loop expects of an optimizer: one compile
however the params are placed, Optax's own test suites, the CPU kernel's
switch, ``jax.export`` to every platform and ``shard_map``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from scale_out.launch import run_script

import optax_amsgrad

from kernel_paths import SWITCH, xla_path
from training_loops import JITTED_INIT, OPTIMIZERS, compiles_over_a_loop, init

HERE = Path(__file__).resolve().parent
PLACEMENTS = ("uncommitted", "one_device")


def params_placed(placement: str) -> dict[str, jax.Array]:
  params = {
      "kernel": jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(4, 6),
      "bias": jnp.full((6,), 0.5, jnp.float32),
      "scale": jnp.float32(2.0),
  }
  return jax.device_put(params, jax.devices()[0]) if placement == "one_device" else params


def init_for(name: str, placement: str) -> str:
  return "jit" if name in JITTED_INIT and placement != "uncommitted" else "eager"


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("call", ["update", "apply_step"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_jitted_training_loop_compiles_once(name, placement, call, donate):
  # chex fails the loop if the step is traced twice; the cache must hold one
  # executable after three steps.
  solver = OPTIMIZERS[name]()
  params = params_placed(placement)
  assert compiles_over_a_loop(solver, params, call=call, donate=donate,
                              init_how=init_for(name, placement)) == 1


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_places_the_state_where_the_step_returns_it(name, placement):
  solver = OPTIMIZERS[name]()
  params = params_placed(placement)
  state = init(solver, params, init_for(name, placement))
  _, stepped = jax.jit(solver.update)(jax.tree.map(jnp.cos, params), state, params)
  placed = lambda tree: [(x.sharding, x.committed) for x in jax.tree.leaves(tree)]
  assert placed(state) == placed(stepped)
  committed = {x.committed for x in jax.tree.leaves(state)}
  assert committed == {placement == "one_device"}


def test_a_loop_that_compiles_twice_is_caught():
  # The control: optax.amsgrad's eager init leaves its count uncommitted
  # beside committed params, and its loop compiles a second executable. (Its
  # Python is traced once: jit reuses the trace, so chex's trace count alone
  # would not see it; the cache size does.)
  params = params_placed("one_device")
  assert compiles_over_a_loop(optax.amsgrad(1e-2), params, call="update", donate=False) == 2


@pytest.fixture(scope="module")
def sharded_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("one_compile")
  run_script("one_compile.py", [str(out)], host_devices=8, timeout=600)
  return json.loads((out / "results.json").read_text())


def test_sharded_training_loops_compile_once(sharded_report):
  compiles = sharded_report["compiles"]
  assert {case.split("/")[1] for case in compiles} == set(OPTIMIZERS)
  assert {case.split("/")[0] for case in compiles} == {"Auto", "Explicit"}
  assert {case: n for case, n in compiles.items() if n != 1} == {}


def test_sharded_init_places_the_state_where_the_step_returns_it(sharded_report):
  placement = sharded_report["placement"]
  assert len(placement) == 8
  assert {case: found for case, found in placement.items() if found} == {}


def test_update_runs_inside_shard_map(sharded_report):
  # Each device updates its block; the result is the plain step's.
  report = sharded_report["shard_map"]
  assert report["compiles"] == 1
  assert report["max_difference"] < 1e-6


def test_optax_own_test_suites_pass_against_amsgrad(tmp_path):
  # optax's alias_test and sharding_test, from the installed optax, with
  # optax.amsgrad replaced by ours (tests/optax_plugin.py).
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "optax_plugin", "-p", "no:cacheprovider",
       "--pyargs", "optax._src.alias_test", "optax._src.sharding_test", "-q"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
  )
  summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed.group(1)) >= 15, summary
  assert "failed" not in summary, summary


# ----------------------------------------------------------------------------
# The CPU kernel's switch, and exporting.
# ----------------------------------------------------------------------------


def train_step(solver):
  def step(params, state, grads):
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def apply_step(solver):
  return lambda params, state, grads: optax_amsgrad.apply_step(solver, grads, state, params)


def kernel_calls(step, *args):
  return len(re.findall(r"optax_amsgrad_\w+", jax.jit(step).lower(*args).as_text()))


needs_kernel = pytest.mark.skipif(
    not optax_amsgrad.cpu_kernel_available(), reason="the CPU kernel was not built"
)


@needs_kernel
@pytest.mark.parametrize("make_step", [train_step, apply_step])
def test_switch_turns_the_kernel_off(monkeypatch, make_step):
  solver = optax_amsgrad.amsgrad(1e-2)
  params = params_placed("uncommitted")
  args = (params, solver.init(params), params)
  monkeypatch.setenv(SWITCH, "1")
  assert optax_amsgrad.cpu_kernel_available()
  assert kernel_calls(make_step(solver), *args) > 0
  monkeypatch.setenv(SWITCH, "0")
  assert not optax_amsgrad.cpu_kernel_available()
  assert kernel_calls(make_step(solver), *args) == 0


SOLVERS = {
    "float32_state": lambda: optax_amsgrad.amsgrad(1e-2),
    "bfloat16_state": lambda: optax_amsgrad.amsgrad(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "flat": lambda: optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgradw(1e-2)),
}


def exported(make_step, solver, platforms):
  """The exported step and its arguments, as flat lists of arrays: the
  serialized form then names no Python classes (Optax's states are not
  registered for serialization)."""
  params = params_placed("uncommitted")
  args, treedef = jax.tree.flatten((params, solver.init(params), params))
  step = make_step(solver)
  flat_step = lambda *leaves: jax.tree.leaves(step(*jax.tree.unflatten(treedef, leaves)))
  return export.export(jax.jit(flat_step), platforms=platforms)(*args), args, treedef


@pytest.mark.parametrize("platforms", [("cuda",), ("rocm",), ("tpu",)])
@pytest.mark.parametrize("make_step", [train_step, apply_step])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_train_step_exports_for_accelerators(solver, make_step, platforms):
  step, _, _ = exported(make_step, SOLVERS[solver](), platforms)
  assert step.platforms == platforms
  assert export.deserialize(step.serialize()).platforms == platforms


@pytest.mark.parametrize("make_step", [train_step, apply_step])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_with_the_switch_a_train_step_exports_for_every_platform(
    monkeypatch, solver, make_step):
  platforms = ("cpu", "cuda", "tpu")
  monkeypatch.setenv(SWITCH, "0")
  step, args, treedef = exported(make_step, SOLVERS[solver](), platforms)
  restored = export.deserialize(step.serialize())
  assert restored.platforms == platforms
  # Run here, on the CPU: the step of the plain program.
  with xla_path():
    expected = jax.jit(make_step(SOLVERS[solver]()))(*jax.tree.unflatten(treedef, args))
  chex.assert_trees_all_equal(restored.call(*args), jax.tree.leaves(expected))


@needs_kernel
def test_without_the_switch_exporting_for_cpu_names_the_kernel(monkeypatch):
  monkeypatch.setenv(SWITCH, "1")
  with pytest.raises(ValueError, match="custom calls"):
    exported(train_step, SOLVERS["float32_state"](), ("cpu", "cuda", "tpu"))


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda",)])
def test_a_shard_mapped_train_step_traces_and_exports(platforms, monkeypatch):
  # With the kernel built and on: inside shard_map every leaf takes the XLA
  # path, on every platform.
  monkeypatch.delenv(SWITCH, raising=False)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  solver = SOLVERS["bfloat16_state"]()
  params = params_placed("uncommitted")
  state = solver.init(params)
  specs = jax.sharding.PartitionSpec("data")
  state_specs = jax.tree.map(lambda x: specs if jnp.ndim(x) else jax.P(), state)
  param_specs = jax.tree.map(lambda x: specs if jnp.ndim(x) else jax.P(), params)
  mapped = jax.jit(jax.shard_map(
      train_step(solver), mesh=mesh, in_specs=(param_specs, state_specs, param_specs),
      out_specs=(param_specs, state_specs),
  ))
  step = export.export(mapped, platforms=platforms)(params, state, params)
  assert step.platforms == platforms
  if platforms == ("cpu",):
    ours = mapped(params, state, params)
    with xla_path():
      plain = jax.jit(train_step(SOLVERS["bfloat16_state"]()))(params, state, params)
    chex.assert_trees_all_close(ours, plain, rtol=1e-6)
    np.testing.assert_array_equal(ours[1][0].count, 1)
