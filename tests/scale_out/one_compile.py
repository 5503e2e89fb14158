"""Compiles per training loop with sharded params, on eight host devices; run
by tests/test_optax_citizen.py.

``python tests/scale_out/one_compile.py OUT_DIR`` (launch.py sets the device
count) writes ``OUT_DIR/results.json``: for each mesh kind, params layout,
optimizer, call and donation, how many executables a jitted loop compiled,
and the same for a ``shard_map``'ed step, with its largest difference from
the plain step.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_amsgrad
from optax_amsgrad import _blockwise

from training_loops import JITTED_INIT, OPTIMIZERS, compiles_over_a_loop

# A spec with one entry per dimension, and one without its trailing None.
# jit returns the full form on meshes with Explicit axes and the short one on
# Auto meshes; params in the other form compile the step again after the
# first call whatever the optimizer (their own outputs are a new cache key).
FULL = {"kernel": P("data", None), "bias": P("data"), "scale": P()}
SHORT = {"kernel": P("data"), "bias": P("data"), "scale": P()}
AS_RETURNED = {AxisType.Auto: SHORT, AxisType.Explicit: FULL}
OTHER_FORM = {AxisType.Auto: FULL, AxisType.Explicit: SHORT}
SHAPES = {"kernel": (16, 8), "bias": (16,), "scale": ()}


# 8-bit state needs leaves of at least _blockwise.MIN_SIZE elements: the
# "int8_state" optimizer gets these params, each shard of the last axis a
# whole number of 256-element blocks. The bias and the scalar stay float32.
INT8_SHAPES = {"kernel": (64, 512), "wide": (16, 2048), "bias": (16,), "scale": ()}
INT8_FULL = {"kernel": P("data", None), "wide": P(None, "model"), "bias": P("data"),
             "scale": P()}
INT8_SHORT = {"kernel": P("data"), "wide": P(None, "model"), "bias": P("data"), "scale": P()}
INT8_AS_RETURNED = {AxisType.Auto: INT8_SHORT, AxisType.Explicit: INT8_FULL}

# A custom call of the CPU kernel in StableHLO text (file names in the
# locations also say optax_amsgrad).
KERNEL_CALL = re.compile(r"custom_call @optax_amsgrad_\w+")
# Any custom call; those that only annotate shardings are no computation.
CUSTOM_CALL = re.compile(r"custom_call @(\w+)")
SHARDING_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)


def sharded_params(mesh: jax.sharding.Mesh, layout: dict[str, P],
                   shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {
      name: jax.device_put(
          jnp.asarray(rng.normal(size=shapes[name]), jnp.float32), NamedSharding(mesh, spec)
      )
      for name, spec in layout.items()
  }


def loop_params(name: str, mesh: jax.sharding.Mesh, axis_type: AxisType) -> dict[str, jax.Array]:
  """The params of optimizer ``name``'s loop, in the spec form jit returns."""
  if name == "int8_state":
    return sharded_params(mesh, INT8_AS_RETURNED[axis_type], INT8_SHAPES)
  return sharded_params(mesh, AS_RETURNED[axis_type])


def eight_bit_leaves(state: Any) -> list[str]:
  """Names of the params whose nu_max is stored in 8-bit blocks."""
  nu_max = optax.tree.get(state, "nu_max")
  return sorted(k for k, v in nu_max.items() if _blockwise.is_quantized(v))


def shard_mapped_step(mesh: jax.sharding.Mesh, solver: optax.GradientTransformation,
                      params: Any) -> tuple[Any, Any]:
  """A data-parallel step written with shard_map, each device updating its
  block of params and state with its block of the gradients; and its state."""
  state = solver.init(params)

  def step(params: dict[str, jax.Array], state: optax.OptState,
           grads: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], optax.OptState]:
    updates, state = solver.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state_specs = jax.tree.map(lambda x: P("data") if jnp.ndim(x) else P(), state)
  mapped = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P("data"), state_specs, P("data")),
      out_specs=(P("data"), state_specs),
  ))
  return mapped, state


def shard_mapped(mesh: jax.sharding.Mesh) -> dict[str, float | int]:
  """The shard_map'ed step against the plain one, with the kernel on and off."""
  report: dict[str, float | int] = {}
  for path in ("kernel", "xla"):
    solver = optax_amsgrad.amsgrad(1e-2, implementation=None if path == "kernel" else "xla")
    kernel = jnp.linspace(-1.0, 1.0, 128, dtype=jnp.float32).reshape(16, 8)
    params = {"kernel": jax.device_put(kernel, NamedSharding(mesh, P("data")))}
    mapped, state = shard_mapped_step(mesh, solver, params)

    @jax.jit
    def plain(params: Any, state: Any, grads: Any, solver: Any = solver) -> Any:
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    ours, theirs = (params, state), (params, state)
    for i in range(3):
      grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
      ours = mapped(*ours, grads)
      theirs = plain(*theirs, grads)
    report[f"{path}/compiles"] = mapped._cache_size()
    report[f"{path}/max_difference"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True)
    )
  return report


def int8_codes(state: Any) -> dict[str, np.ndarray]:
  """Codes (as signed integers ordered like their values) and block exponents
  of every 8-bit leaf, by "buffer/param/part"."""
  found = {}
  for buffer in ("mu", "nu", "nu_max"):
    for name, leaf in optax.tree.get(state, buffer).items():
      if not _blockwise.is_quantized(leaf):
        continue
      codes = np.asarray(leaf.codes, np.int32)
      if buffer == "mu":  # sign and magnitude
        codes = np.where(codes >= 0x80, -(codes & 0x7F), codes)
      found[f"{buffer}/{name}/codes"] = codes
      found[f"{buffer}/{name}/exponents"] = np.asarray(leaf.exponents)
  return found


def shard_mapped_int8(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """8-bit state in a shard_map'ed step against the plain step: rounded to
  nearest, the same codes and exponents after three steps; rounded
  stochastically (each shard
  draws its random bits by its own positions), one code apart at most after
  one step from the same state."""
  report: dict[str, Any] = {}
  kernel = jnp.linspace(-1.0, 1.0, 64 * 512, dtype=jnp.float32).reshape(64, 512)
  params = {"kernel": jax.device_put(kernel, NamedSharding(mesh, P("data"))),
            "bias": jax.device_put(jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32),
                                   NamedSharding(mesh, P("data")))}
  for rounding, steps in (("nearest", 3), ("stochastic", 1)):
    solver = optax_amsgrad.amsgrad(1e-2, mu_dtype="int8", nu_dtype="int8",
                                   state_rounding=rounding)
    mapped, state = shard_mapped_step(mesh, solver, params)

    @jax.jit
    def plain(params: Any, state: Any, grads: Any, solver: Any = solver) -> Any:
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    ours, theirs = (params, state), (params, state)
    for i in range(steps):
      grads = jax.tree.map(lambda p, i=i: jnp.sin(3 * p * (i + 1)) * jnp.exp(-4 * p * p),
                           params)
      ours = mapped(*ours, grads)
      theirs = plain(*theirs, grads)
    case = f"int8_{rounding}"
    report[f"{case}/compiles"] = mapped._cache_size()
    report[f"{case}/collectives"] = len(COLLECTIVE.findall(
        mapped.lower(params, state, params).compile().as_text()))
    report[f"{case}/eight_bit"] = eight_bit_leaves(ours[1])
    a, b = int8_codes(ours[1]), int8_codes(theirs[1])
    report[f"{case}/exponents_differ"] = sum(
        int(np.sum(a[k] != b[k])) for k in a if k.endswith("exponents"))
    report[f"{case}/codes_differ"] = sum(
        int(np.sum(a[k] != b[k])) for k in a if k.endswith("codes"))
    report[f"{case}/codes_max_distance"] = max(
        int(np.max(np.abs(a[k] - b[k]))) for k in a if k.endswith("codes"))
    report[f"{case}/codes"] = sum(a[k].size for k in a if k.endswith("codes"))
    report[f"{case}/params_max_difference"] = max(
        float(jnp.max(jnp.abs(ours[0][k] - theirs[0][k]))) for k in params)
  return report


def shard_mapped_replicas(mesh: jax.sharding.Mesh) -> dict[str, int]:
  """Data parallelism written with shard_map: params and state replicated on
  every device, each device's gradients averaged with ``lax.pmean``. With
  state stored in bfloat16 and in 8 bits, rounded stochastically, every
  replica must stay the same: how many elements of the params and of the
  state differ between replicas after three steps (0), and between the
  first and the last step (nonzero: the steps moved them)."""
  report: dict[str, int] = {}
  kernel = jnp.linspace(-1.0, 1.0, 64 * 512, dtype=jnp.float32).reshape(64, 512)
  params = {"kernel": jax.device_put(kernel, NamedSharding(mesh, P()))}
  devices = mesh.shape["data"]
  for name, options in (("bfloat16", {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}),
                        ("int8", {"mu_dtype": "int8", "nu_dtype": "int8"})):
    solver = optax_amsgrad.amsgrad(1e-2, state_rounding="stochastic", **options)

    def step(params: Any, state: Any, grads: Any, solver: Any = solver) -> Any:
      grads = jax.lax.pmean(jax.tree.map(lambda g: g[0], grads), "data")
      updates, state = solver.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      # Each device's replica, stacked along the mesh axis.
      return jax.tree.map(lambda y: y[None], (params, state))

    mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                   out_specs=P("data")))
    first = None
    differ = 0
    replicas = (params, solver.init(params))
    for i in range(3):
      grads = jax.tree.map(lambda p, i=i: jnp.stack(
          [jnp.sin(3 * p * (i + 1) + d) * jnp.exp(-4 * p * p) for d in range(devices)]), params)
      stacked = mapped(*replicas, grads)
      leaves = [np.asarray(x) for x in jax.tree.leaves(stacked)]
      differ += sum(int(np.sum(x != x[:1])) for x in leaves if x.ndim > 1)
      replicas = jax.tree.map(lambda x: x[0], stacked)
      if first is None:
        first = leaves
    report[f"{name}/differ_between_replicas"] = differ
    report[f"{name}/moved"] = sum(int(np.sum(a[0] != b[0])) for a, b in zip(
        first, leaves, strict=True) if a.ndim > 1)
    report[f"{name}/eight_bit"] = eight_bit_leaves(replicas[1]) if name == "int8" else []
  return report


def exports(mesh: jax.sharding.Mesh) -> dict[str, str]:
  """A train step exported for each accelerator platform, float32 and
  bfloat16 state, sharded and inside shard_map: "ok" when it exports with no
  custom call of the CPU kernel, else what went wrong."""
  found: dict[str, str] = {}
  for state_name, options, shape in (
      ("float32", {}, (16, 8)),
      ("bfloat16", {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, (16, 8)),
      # Large enough for 8-bit blocks.
      ("int8", {"mu_dtype": "int8", "nu_dtype": "int8"}, (64, 512)),
  ):
    solver = optax_amsgrad.amsgrad(1e-2, **options)
    kernel = jnp.linspace(-1.0, 1.0, int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
    params = {"kernel": jax.device_put(kernel, NamedSharding(mesh, P("data")))}
    mapped, state = shard_mapped_step(mesh, solver, params)

    def step(params: Any, state: Any, grads: Any, solver: Any = solver) -> Any:
      updates, state = solver.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for layout, function in (("sharded", jax.jit(step)), ("shard_map", mapped)):
      for platform in ("cuda", "rocm", "tpu"):
        case = f"{platform}/{state_name}/{layout}"
        try:
          exported = export.export(function, platforms=(platform,))(params, state, params)
          text = exported.mlir_module()
          calls = sorted(set(CUSTOM_CALL.findall(text)) - SHARDING_CALLS)
          if KERNEL_CALL.search(text):
            found[case] = "kernel custom call"
          elif calls:
            found[case] = f"custom calls {calls}"
          elif state_name == "int8" and eight_bit_leaves(state) != ["kernel"]:
            found[case] = "no 8-bit state"
          else:
            found[case] = "ok"
        except Exception as error:  # recorded, and the test names it
          found[case] = f"{type(error).__name__}: {str(error)[:200]}"
  return found


def placement_mismatches(solver: optax.GradientTransformation, params: Any) -> list[str]:
  """State leaves whose sharding or committedness after ``init`` differs from
  what a jitted step returns."""
  state = solver.init(params)
  grads = jax.tree.map(jnp.cos, params)
  _, stepped = jax.jit(solver.update)(grads, state, params)
  found = []
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(stepped), strict=True):
    if (a.sharding, a.committed) != (b.sharding, b.committed):
      found.append(f"{jax.tree_util.keystr(path)}: init {a.sharding} "
                   f"(committed={a.committed}), step {b.sharding} (committed={b.committed})")
  return found


def main() -> None:
  out = Path(sys.argv[1])
  compiles: dict[str, int | str] = {}
  placement: dict[str, list[str]] = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    # Every optimizer through both calls, donated and not.
    for name in OPTIMIZERS:
      for call in ("update", "apply_step"):
        for donate in (False, True):
          if name == "flatten_by_dtype" and axis_type == AxisType.Explicit:
            # Concatenating leaves of different shardings is a type error on
            # Explicit axes: the flat layout is for unsharded params (README).
            continue
          case = f"{axis_type.name}/{name}/{call}/donate={donate}"
          init_how = "jit" if name in JITTED_INIT else "eager"
          try:
            with jax.set_mesh(mesh):
              compiles[case] = compiles_over_a_loop(
                  OPTIMIZERS[name](), loop_params(name, mesh, axis_type),
                  call=call, donate=donate, init_how=init_how,
              )
          except AssertionError as error:  # chex: traced more than once
            compiles[case] = str(error).splitlines()[0]
    for form, layouts in (("as_returned", AS_RETURNED), ("other_form", OTHER_FORM)):
      for name in ("amsgrad", "bfloat16_state", "int8_state"):
        if name == "int8_state":
          int8_layouts = INT8_AS_RETURNED if form == "as_returned" else {
              AxisType.Auto: INT8_FULL, AxisType.Explicit: INT8_SHORT}
          params = sharded_params(mesh, int8_layouts[axis_type], INT8_SHAPES)
        else:
          params = sharded_params(mesh, layouts[axis_type])
        with jax.set_mesh(mesh):
          placement[f"{axis_type.name}/{form}/{name}"] = placement_mismatches(
              OPTIMIZERS[name](), params)
  auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  report = {"compiles": compiles, "placement": placement,
            "shard_map": {**shard_mapped(auto), **shard_mapped_int8(auto)},
            "shard_map_replicas": shard_mapped_replicas(auto),
            "exports": exports(auto),
            "int8_eight_bit": eight_bit_leaves(OPTIMIZERS["int8_state"]().init(
                sharded_params(auto, {"kernel": P("data"), "wide": P(None, "data"),
                                      "bias": P("data"), "scale": P()}, INT8_SHAPES)))}
  out.joinpath("results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
