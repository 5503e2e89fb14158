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

from training_loops import (
  JITTED_INIT,
  OPTIMIZERS,
  apply_step,
  compiles_over_a_loop,
  init,
  train_step,
)

SWITCH = "OPTAX_AMSGRAD_CPU_KERNEL"

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
@pytest.mark.both_modes
def test_a_jitted_training_loop_compiles_once(name, placement, call, donate):
  # chex fails the loop if the step is traced twice; the cache must hold one
  # executable after three steps.
  solver = OPTIMIZERS[name]()
  params = params_placed(placement)
  assert compiles_over_a_loop(solver, params, call=call, donate=donate,
                              init_how=init_for(name, placement)) == 1


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.both_modes
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
  assert len(placement) == 12
  assert {case: found for case, found in placement.items() if found} == {}


@pytest.mark.parametrize("path", ["kernel", "xla"])
def test_update_runs_inside_shard_map(sharded_report, path):
  # Each device updates its block; the result is the plain step's, with the
  # kernel on (inside shard_map it takes the XLA path) and off.
  report = sharded_report["shard_map"]
  assert report[f"{path}/compiles"] == 1
  assert report[f"{path}/max_difference"] < 1e-6


def test_sharded_and_shard_mapped_steps_export_for_accelerators(sharded_report):
  # cuda, rocm and tpu; float32, bfloat16 and 8-bit state; sharded over 8
  # devices and inside shard_map: each exports, with no custom call but the
  # sharding annotations.
  exports = sharded_report["exports"]
  assert len(exports) == 18
  assert {case.split("/")[1] for case in exports} == {"float32", "bfloat16", "int8"}
  assert {case: outcome for case, outcome in exports.items() if outcome != "ok"} == {}


def test_sharded_int8_loops_have_eight_bit_state(sharded_report):
  # The int8 loops above run on leaves large enough for 8-bit blocks.
  assert sharded_report["int8_eight_bit"] == ["kernel", "wide"]


def test_int8_update_runs_inside_shard_map(sharded_report):
  report = sharded_report["shard_map"]
  for rounding in ("nearest", "stochastic"):
    case = f"int8_{rounding}"
    assert report[f"{case}/eight_bit"] == ["kernel"], case
    assert report[f"{case}/compiles"] == 1, case
    assert report[f"{case}/collectives"] == 0, case
    assert report[f"{case}/codes"] == 3 * 64 * 512, case
  # Rounded to nearest, each device's blocks are the plain step's blocks:
  # after three steps the same codes and exponents, bit for bit. The params
  # follow as in the float32 shard_map test (XLA fuses the two programs'
  # float32 arithmetic its own way: measured 1 element of 32,784 apart).
  assert report["int8_nearest/codes_differ"] == 0
  assert report["int8_nearest/exponents_differ"] == 0
  assert report["int8_nearest/params_max_difference"] < 1e-6
  # Rounded stochastically, a shard draws its random bits by its own
  # positions, not the global ones: the same block scales, and codes that
  # differ (they do) by one at most.
  assert report["int8_stochastic/exponents_differ"] == 0
  assert report["int8_stochastic/codes_differ"] > 0
  assert report["int8_stochastic/codes_max_distance"] == 1


def test_replicas_inside_shard_map_round_alike(sharded_report):
  # Data parallelism in shard_map: params and state replicated, gradients
  # averaged with pmean. Stochastic rounding draws the same bits on every
  # device, so bfloat16 and 8-bit state stay equal across the replicas
  # (keys that depended on the device made about 700,000 elements differ).
  report = sharded_report["shard_map_replicas"]
  assert report["int8/eight_bit"] == ["kernel"]
  for state in ("bfloat16", "int8"):
    assert report[f"{state}/moved"] > 100_000, state
    assert report[f"{state}/differ_between_replicas"] == 0, state


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


def kernel_calls(step, *args):
  return len(re.findall(r"custom_call @optax_amsgrad_\w+", jax.jit(step).lower(*args).as_text()))


needs_kernel = pytest.mark.skipif(
    not optax_amsgrad.cpu_kernel_available(), reason="the CPU kernel was not built"
)


@needs_kernel
@pytest.mark.parametrize("make_step", [train_step, apply_step])
def test_the_implementation_is_chosen_when_the_solver_is_built(monkeypatch, make_step):
  params = params_placed("uncommitted")
  monkeypatch.setenv(SWITCH, "1")
  kernel = optax_amsgrad.amsgrad(1e-2)
  monkeypatch.setenv(SWITCH, "0")
  plain = optax_amsgrad.amsgrad(1e-2)
  # The switch sets the default when a solver is built; tracing later, with
  # the environment changed again, does not read it.
  monkeypatch.setenv(SWITCH, "1")
  assert optax_amsgrad.cpu_kernel_available()
  assert kernel_calls(make_step(plain), params, plain.init(params), params) == 0
  monkeypatch.setenv(SWITCH, "0")
  assert kernel_calls(make_step(kernel), params, kernel.init(params), params) > 0
  # An explicit choice is not the environment's.
  explicit = optax_amsgrad.amsgrad(1e-2, implementation="cpu")
  assert kernel_calls(make_step(explicit), params, explicit.init(params), params) > 0


@needs_kernel
def test_a_jitted_step_keeps_the_implementation_it_was_built_with(monkeypatch):
  params = params_placed("uncommitted")
  traces = []
  for implementation in ("cpu", "xla"):
    solver = optax_amsgrad.amsgrad(1e-2, implementation=implementation)

    def step(params, state, grads, solver=solver):
      traces.append(None)
      return train_step(solver)(params, state, grads)

    jitted = jax.jit(step)
    args = (params, solver.init(params), params)
    before = jitted.lower(*args).as_text()
    jitted(*args)
    monkeypatch.setenv(SWITCH, "0" if implementation == "cpu" else "1")
    jitted(*args)
    after = jitted.lower(*args).as_text()
    monkeypatch.delenv(SWITCH)
    assert before == after
    assert ("optax_amsgrad_" in after) == (implementation == "cpu")
  # Each jitted step traced once for its call and lowerings: no retrace
  # when the environment changed.
  assert len(traces) == 2


@pytest.mark.both_modes
def test_implementation_choices_are_checked(monkeypatch):
  for make in (optax_amsgrad.scale_by_amsgrad, lambda **k: optax_amsgrad.amsgrad(1e-2, **k),
               lambda **k: optax_amsgrad.amsgradw(1e-2, **k),
               lambda **k: optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgrad(1e-2), **k)):
    with pytest.raises(ValueError, match="implementation must be one of 'xla', 'cpu' or None"):
      make(implementation="gpu")
  monkeypatch.setattr(optax_amsgrad.cpu, "available", lambda: False)
  with pytest.raises(ValueError, match="CPU kernel of optax_amsgrad was not built"):
    optax_amsgrad.amsgrad(1e-2, implementation="cpu")
  # None falls back to XLA where the kernel is missing.
  assert optax_amsgrad.amsgrad(1e-2).update.recipe.core.options.implementation == "xla"


SOLVERS = {
    "float32_state": lambda **k: optax_amsgrad.amsgrad(1e-2, **k),
    "bfloat16_state": lambda **k: optax_amsgrad.amsgrad(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, **k),
    "flat": lambda **k: optax_amsgrad.flatten_by_dtype(optax_amsgrad.amsgradw(1e-2, **k)),
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
def test_on_the_xla_path_a_train_step_exports_for_every_platform(solver, make_step):
  platforms = ("cpu", "cuda", "tpu")
  xla = SOLVERS[solver](implementation="xla")
  step, args, treedef = exported(make_step, xla, platforms)
  restored = export.deserialize(step.serialize())
  assert restored.platforms == platforms
  # Run here, on the CPU: the step of the plain program.
  expected = jax.jit(make_step(xla))(*jax.tree.unflatten(treedef, args))
  chex.assert_trees_all_equal(restored.call(*args), jax.tree.leaves(expected))


def test_the_switch_sets_the_default_for_export(monkeypatch):
  monkeypatch.setenv(SWITCH, "0")
  step, _, _ = exported(train_step, SOLVERS["float32_state"](), ("cpu", "cuda", "tpu"))
  assert step.platforms == ("cpu", "cuda", "tpu")


@needs_kernel
def test_with_the_kernel_exporting_for_cpu_names_the_kernel():
  with pytest.raises(ValueError, match="custom calls"):
    exported(train_step, SOLVERS["float32_state"](implementation="cpu"),
             ("cpu", "cuda", "tpu"))


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda",)])
def test_a_shard_mapped_train_step_traces_and_exports(platforms):
  # With the kernel: inside shard_map every leaf takes the XLA path, on every
  # platform.
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
    plain_solver = SOLVERS["bfloat16_state"](implementation="xla")
    plain = jax.jit(train_step(plain_solver))(params, state, params)
    chex.assert_trees_all_close(ours, plain, rtol=1e-6)
    np.testing.assert_array_equal(ours[1][0].count, 1)


# ----------------------------------------------------------------------------
# Under the transformations users wrap a step in.
# ----------------------------------------------------------------------------

STEPS_UNDER = 3


def plain_loop(solver, params, grads_seq):
  state = solver.init(params)
  step = jax.jit(train_step(solver))
  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params, state


def gradient_sequence(params):
  return [jax.tree.map(lambda p, k=k: jnp.sin(3.0 * p + k), params)
          for k in range(STEPS_UNDER)]


def under_pmap(solver, params, grads_seq):
  # One replica per local device, each with the same data: every replica
  # ends where the plain loop does.
  n = jax.local_device_count()
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)
  step = jax.pmap(train_step(solver), axis_name="devices")
  params, state = replicate(params), replicate(solver.init(params))
  for grads in grads_seq:
    params, state = step(params, state, replicate(grads))
  return jax.tree.map(lambda x: x[0], (params, state))


def under_vmap(solver, params, grads_seq):
  # Three members, the second with the data of the plain loop.
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x * 0.5, x, x * 2.0]), tree)
  step = jax.jit(jax.vmap(train_step(solver)))
  params, state = stack(params), jax.vmap(solver.init)(stack(params))
  for grads in grads_seq:
    params, state = step(params, state, stack(grads))
  return jax.tree.map(lambda x: x[1], (params, state))


def under_checkpoint(solver, params, grads_seq):
  state = solver.init(params)
  step = jax.jit(jax.checkpoint(train_step(solver)))
  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params, state


def under_scan(solver, params, grads_seq):
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads_seq)

  @jax.jit
  def run(params, state, stacked):
    def body(carry, grads):
      return train_step(solver)(*carry, grads), None
    return jax.lax.scan(body, (params, state), stacked)[0]

  return run(params, solver.init(params), stacked)


def under_cond(solver, params, grads_seq):
  # A step that is skipped when told to: the skipped call changes nothing.
  @jax.jit
  def step(params, state, grads, skip):
    return jax.lax.cond(skip, lambda *a: a[:2], train_step(solver), params, state, grads)

  state = solver.init(params)
  for grads in grads_seq:
    params, state = step(params, state, grads, False)
    params, state = step(params, state, jax.tree.map(lambda g: g * 1e3, grads), True)
  return params, state


@pytest.mark.parametrize("path", ["kernel", "xla"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize(
    "transform", [under_pmap, under_vmap, under_checkpoint, under_scan, under_cond],
    ids=lambda f: f.__name__,
)
def test_steps_under_a_transformation_follow_the_plain_loop(transform, solver, path):
  params = params_placed("uncommitted")
  grads_seq = gradient_sequence(params)
  implementation = None if path == "kernel" else "xla"
  expected = plain_loop(SOLVERS[solver](implementation=implementation), params, grads_seq)
  actual = transform(SOLVERS[solver](implementation=implementation), params, grads_seq)
  chex.assert_trees_all_equal_structs(actual, expected)
  # XLA fuses a batched or rematerialized step its own way: a rounding of
  # the float32 params per step apart at most. The states' moments follow.
  chex.assert_trees_all_close(actual[0], expected[0], rtol=1e-6, atol=1e-7)
  assert int(optax.tree.get(actual[1], "count")) == STEPS_UNDER
