"""8-bit state (``mu_dtype="int8"``, ``nu_dtype="int8"``) where a training
loop runs: one compile over a jitted loop, and ``jax.export`` of a train step
and of an ``apply_step`` to accelerators with no custom call.

Sharded params on eight devices and ``shard_map`` are checked in processes of
their own (tests/test_sharding.py, tests/test_optax_citizen.py).
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import optax_amsgrad
from optax_amsgrad import _blockwise

from training_loops import OPTIMIZERS, apply_step, compiles_over_a_loop, init, train_step

pytestmark = pytest.mark.both_modes

PLACEMENTS = ("uncommitted", "one_device")
# The leaves stored in 8-bit blocks; "bias" and "scale" are too small and
# keep float32 state.
EIGHT_BIT = ["embedding", "kernel"]


def params_placed(placement: str) -> dict[str, jax.Array]:
  params = {
      # A whole number of 256-element blocks per row, and rows of one
      # partial block.
      "kernel": jnp.linspace(-1.0, 1.0, 32 * 512, dtype=jnp.float32).reshape(32, 512),
      "embedding": jnp.linspace(-2.0, 2.0, 128 * 64, dtype=jnp.float32).reshape(128, 64),
      "bias": jnp.full((512,), 0.5, jnp.float32),
      "scale": jnp.float32(2.0),
  }
  return jax.device_put(params, jax.devices()[0]) if placement == "one_device" else params


def eight_bit(state: optax.OptState) -> dict[str, list[str]]:
  """The params whose moments are stored in 8-bit blocks, per buffer."""
  return {
      buffer: sorted(k for k, v in optax.tree.get(state, buffer).items()
                     if _blockwise.is_quantized(v))
      for buffer in ("mu", "nu", "nu_max")
  }


def int8_solver(**options):
  return optax_amsgrad.amsgrad(1e-2, mu_dtype="int8", nu_dtype="int8", **options)


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("call", ["update", "apply_step"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_int8_training_loop_compiles_once(placement, call, donate, implementation):
  solver = int8_solver(implementation=implementation)
  params = params_placed(placement)
  assert eight_bit(solver.init(params)) == {b: EIGHT_BIT for b in ("mu", "nu", "nu_max")}
  assert compiles_over_a_loop(solver, params, call=call, donate=donate) == 1


def test_the_loops_int8_optimizer_stores_these_params_in_8_bits():
  # OPTIMIZERS["int8_state"] is the one the sharded loops run.
  state = OPTIMIZERS["int8_state"]().init(params_placed("one_device"))
  assert eight_bit(state)["nu_max"] == EIGHT_BIT


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_int8_init_places_the_state_where_the_step_returns_it(placement):
  solver = OPTIMIZERS["int8_state"]()
  params = params_placed(placement)
  state = init(solver, params, "eager")
  _, stepped = jax.jit(solver.update)(jax.tree.map(jnp.cos, params), state, params)
  placed = lambda tree: [(x.sharding, x.committed) for x in jax.tree.leaves(tree)]
  assert placed(state) == placed(stepped)


# ----------------------------------------------------------------------------
# jax.export
# ----------------------------------------------------------------------------


def exported(make_step, solver, platforms):
  """The exported step and its flat arguments (the serialized form names no
  Python classes)."""
  params = params_placed("uncommitted")
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) * jnp.exp(-p * p), params)
  args, treedef = jax.tree.flatten((params, solver.init(params), grads))
  step = make_step(solver)
  flat_step = lambda *leaves: jax.tree.leaves(step(*jax.tree.unflatten(treedef, leaves)))
  return export.export(jax.jit(flat_step), platforms=platforms)(*args), args, treedef


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize("platforms", [("cuda",), ("rocm",), ("tpu",)])
@pytest.mark.parametrize("make_step", [train_step, apply_step])
def test_int8_step_exports_for_accelerators_with_no_custom_call(make_step, platforms,
                                                                 implementation):
  step, _, _ = exported(make_step, int8_solver(implementation=implementation), platforms)
  assert step.platforms == platforms
  text = step.mlir_module()
  assert re.findall(r"custom_call @\w+", text) == []
  # The exported program works on the 8-bit codes: uint8 state in and out.
  assert "tensor<32x512xui8>" in text
  assert export.deserialize(step.serialize()).platforms == platforms


@pytest.mark.parametrize("make_step", [train_step, apply_step])
def test_int8_exported_step_runs_as_the_jitted_one(make_step):
  # Exported for several platforms, run here on the CPU: the jitted step
  # bit for bit, stochastic rounding included. (With the default
  # implementation the float32 leaves would call the CPU kernel on "cpu",
  # which export refuses; the 8-bit leaves take the XLA path either way.)
  solver = int8_solver(implementation="xla")
  step, args, treedef = exported(make_step, solver, ("cpu", "cuda", "tpu"))
  assert re.findall(r"custom_call @\w+", step.mlir_module()) == []
  restored = export.deserialize(step.serialize())
  expected = jax.jit(make_step(solver))(*jax.tree.unflatten(treedef, args))
  assert eight_bit(expected[1]) == {b: EIGHT_BIT for b in ("mu", "nu", "nu_max")}
  chex.assert_trees_all_equal(restored.call(*args), jax.tree.leaves(expected))
