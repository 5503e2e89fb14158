"""Sharding checks on eight host devices, run by tests/test_sharding.py.

``python tests/scale_out/eight_devices.py OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (launch.py sets it). It
writes ``OUT_DIR/results.json`` (facts measured here; the test asserts on them)
and the data-parallel example's final params as ``OUT_DIR/params_*.npz``.
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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from launch import load_example

import optax_amsgrad
from optax_amsgrad import _blockwise, _placement

COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)

# (shape, dtype, spec) on a ("data", "model") = (4, 2) mesh.
MIXED_LAYOUT = {
    "kernel": ((16, 8), jnp.float32, P("data", "model")),
    "stacked": ((3, 8, 4), jnp.float32, P(None, "data", "model")),
    "bias": ((8,), jnp.float32, P("model")),
    "replicated": ((3, 5), jnp.float32, P()),
    "half": ((8, 6), jnp.bfloat16, P("data")),
    "complex": ((4, 4), jnp.complex64, P(None, "data")),
}

# Fully sharded (FSDP) layout on an ("fsdp",) = (8,) mesh: every leaf split.
FSDP_LAYOUT = {
    "embedding": ((64, 32), P("fsdp", None)),
    "kernel": ((32, 64), P(None, "fsdp")),
    "stacked": ((2, 16, 24), P(None, "fsdp", None)),
    "bias": ((128,), P("fsdp")),
}


def optimizers() -> dict[str, optax.GradientTransformation]:
  return {
      "pytorch": optax_amsgrad.amsgrad(1e-3),
      # Real bfloat16 nu and nu_max, also for the complex param.
      "optax_bfloat16": optax_amsgrad.amsgrad(
          1e-3, convention="optax", nu_dtype=jnp.bfloat16
      ),
      "keras": optax_amsgrad.amsgrad(1e-3, convention="keras", eps_root=1e-12),
      "paper_b1_schedule": optax_amsgrad.amsgrad(
          1e-3, b1=lambda t: 0.9 / jnp.sqrt(t + 1.0), convention="paper"
      ),
      "amsgradw": optax_amsgrad.amsgradw(
          1e-3, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
      ),
      # float32 hyperparameters whatever the params' dtypes (complex here).
      "inject_hyperparams": optax.inject_hyperparams(
          optax_amsgrad.amsgrad, hyperparam_dtype=jnp.float32
      )(learning_rate=1e-3, b1=0.9),
  }


def moments(state: Any) -> list[tuple[str, Any]]:
  """(param name, leaf) for every mu, nu and nu_max leaf of a state."""
  found = []
  for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax_amsgrad.ScaleByAmsgradState)
  ):
    if isinstance(node, optax_amsgrad.ScaleByAmsgradState):
      for tree in (node.mu, node.nu, node.nu_max):
        found.extend(tree.items())
  assert found, "no ScaleByAmsgradState in the state"
  return found


def same_layout(a: Any, b: NamedSharding, ndim: int) -> bool:
  """Whether sharding ``a`` places an array like ``b``. ``a`` may be on an
  AbstractMesh (shardings from eval_shape), compared by mesh axes and spec."""
  if a is None:
    return False
  if not isinstance(getattr(a, "mesh", None), jax.sharding.AbstractMesh):
    return bool(a.is_equivalent_to(b, ndim))

  def spec(s: NamedSharding) -> tuple[Any, ...]:
    entries = [*s.spec, *([None] * (ndim - len(s.spec)))]
    return tuple(e if isinstance(e, tuple) or e is None else (e,) for e in entries)

  return a.mesh.shape_tuple == b.mesh.shape_tuple and spec(a) == spec(b)


def mismatches(state: Any, shardings: dict[str, Any], ndims: dict[str, int]) -> list[str]:
  """Moment leaves whose sharding is not their param's."""
  bad = []
  for name, leaf in moments(state):
    sharding = getattr(leaf, "sharding", leaf)
    if not same_layout(sharding, shardings[name], ndims[name]):
      bad.append(f"{name}: {sharding} != {shardings[name]}")
  return bad


def mixed_params(axis_type: AxisType) -> dict[str, jax.Array]:
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  rng = np.random.default_rng(0)
  params = {}
  for name, (shape, dtype, spec) in MIXED_LAYOUT.items():
    value = rng.normal(size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      value = value + 1j * rng.normal(size=shape)
    params[name] = jax.device_put(jnp.asarray(value, dtype), NamedSharding(mesh, spec))
  return params


def init_ways(
    opt: optax.GradientTransformation,
    params: dict[str, jax.Array],
    abstract: dict[str, jax.ShapeDtypeStruct],
    axis_type: AxisType,
) -> dict[str, Any]:
  """The state (or its shardings) from each way of calling ``init``."""
  ways = {
      "eager": opt.init(params),
      "jit": jax.jit(opt.init)(params),
      "shape_dtype_struct": opt.init(abstract),
      "compiled_output_shardings": jax.jit(opt.init)
      .lower(abstract)
      .compile()
      .output_shardings,
  }
  if axis_type == AxisType.Explicit:
    # With Explicit axes shardings are part of the types: eval_shape has them.
    ways["eval_shape"] = jax.eval_shape(opt.init, abstract)
  return ways


def check_init(report: dict[str, Any]) -> None:
  """Every moment leaf has its param's sharding, however init is called."""
  results = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    params = mixed_params(axis_type)
    shardings = {k: v.sharding for k, v in params.items()}
    ndims = {k: v.ndim for k, v in params.items()}
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
        for k, v in params.items()
    }
    for opt_name, opt in optimizers().items():
      for way, state in init_ways(opt, params, abstract, axis_type).items():
        results[f"{axis_type.name}/{opt_name}/{way}"] = mismatches(state, shardings, ndims)
  report["init"] = results


def check_steps(report: dict[str, Any]) -> None:
  """Shardings after each of three jitted steps (no out_shardings given)."""
  results = {}
  for axis_type, opt_name in (
      (AxisType.Auto, "pytorch"),
      (AxisType.Auto, "inject_hyperparams"),
      (AxisType.Explicit, "optax_bfloat16"),
  ):
    opt = optimizers()[opt_name]
    params = mixed_params(axis_type)
    shardings = {k: v.sharding for k, v in params.items()}
    ndims = {k: v.ndim for k, v in params.items()}

    @jax.jit
    def step(params, state, opt=opt):
      grads = jax.tree.map(lambda x: jnp.sin(x) + 0.1, params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = jax.jit(opt.init)(params)
    problems = []
    for t in range(3):
      params, state = step(params, state)
      problems += [f"step {t} state {p}" for p in mismatches(state, shardings, ndims)]
      problems += [
          f"step {t} param {k}"
          for k, v in params.items()
          if not v.sharding.is_equivalent_to(shardings[k], v.ndim)
      ]
    results[f"{axis_type.name}/{opt_name}"] = problems
  report["steps"] = results


def count_collectives(hlo_text: str) -> dict[str, int]:
  counts: dict[str, int] = {}
  for match in COLLECTIVE.finditer(hlo_text):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def check_fsdp_collectives(report: dict[str, Any]) -> None:
  """Collectives in the compiled update of fully sharded params, and the
  state's bytes on each device."""
  results: dict[str, Any] = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    params = {
        name: jax.device_put(
            jnp.full(shape, 0.5, jnp.float32), NamedSharding(mesh, spec)
        )
        for name, (shape, spec) in FSDP_LAYOUT.items()
    }
    named = dict(optimizers())
    # A control that needs communication: the global norm sums over devices.
    named["control_clip_by_global_norm"] = optax.chain(
        optax.clip_by_global_norm(1.0), optax_amsgrad.amsgrad(1e-3)
    )
    for opt_name, opt in named.items():
      if axis_type == AxisType.Explicit and opt_name not in (
          "pytorch", "control_clip_by_global_norm"
      ):
        continue  # the options are covered on Auto axes; compiles are slow here
      state = opt.init(params)

      def step(params, state, grads, opt=opt):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      compiled = (
          jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
      )
      entry: dict[str, Any] = {"collectives": count_collectives(compiled.as_text())}
      if opt_name in ("pytorch", "optax_bfloat16", "amsgradw", "paper_b1_schedule"):
        # The same step in one call: one pass per shard, no communication.
        applied = jax.jit(
            lambda p, s, g, opt=opt: optax_amsgrad.apply_step(opt, g, s, p),
            donate_argnums=(0, 1),
        ).lower(params, state, params).compile().as_text()
        entry["apply_step_collectives"] = count_collectives(applied)
        entry["apply_step_one_pass"] = "optax_amsgrad_step" in applied
      if opt_name == "pytorch":
        leaves = [leaf for _, leaf in moments(state)]
        entry["state_bytes_total"] = sum(leaf.nbytes for leaf in leaves)
        entry["state_bytes_per_device"] = {
            str(device.id): sum(
                s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
                if s.device == device
            )
            for device in mesh.devices.flat
        }
        entry["param_bytes_total"] = sum(p.nbytes for p in params.values())
      results[f"{axis_type.name}/{opt_name}"] = entry
  report["fsdp"] = results


def check_sharded_rounding(report: dict[str, Any]) -> None:
  """bfloat16 state after steps on sharded params against one device: the
  random bits follow each element's global position, so with the XLA path on
  both sides the states are bit-identical. By default one device runs the
  CPU handler and the shards round in XLA (the handler sees only its shard),
  which differ where XLA fuses a multiply-add: rarely a rounding decision."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  results: dict[str, Any] = {}
  for path in ("xla", "default"):
    for kind, options in (
        ("bfloat16_stochastic", {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}),
        ("float32", {}),
    ):
      opt = optax_amsgrad.amsgrad(
          1e-2, **options, implementation="xla" if path == "xla" else None)
      states = {}
      for where in ("sharded", "single"):
        params = {
            name: jnp.linspace(-1, 1, int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
            for name, (shape, _) in FSDP_LAYOUT.items()
        }
        if where == "sharded":
          params = {name: jax.device_put(x, NamedSharding(mesh, FSDP_LAYOUT[name][1]))
                    for name, x in params.items()}
        else:
          params = jax.device_put(params, jax.devices()[0])

        @jax.jit
        def step(params, state, t, opt=opt):
          grads = jax.tree.map(lambda p_leaf: jnp.sin(7 * p_leaf + t) * (1 + t), params)
          return optax_amsgrad.apply_step(opt, grads, state, params)

        state = opt.init(params)
        for t in range(5):
          params, state = step(params, state, jnp.float32(t))
        states[where] = [np.asarray(leaf, np.float64) for _, leaf in moments(state)]
      differ = sum(int(np.sum(a != b)) for a, b in
                   zip(states["sharded"], states["single"], strict=True))
      total = sum(a.size for a in states["single"])
      results[f"{path}/{kind}"] = {"differ": differ, "total": total}
  report["sharded_rounding"] = results


# 8-bit state (mu_dtype and nu_dtype "int8") on an ("fsdp",) = (8,) mesh, in
# the spec form a jitted step returns on Auto axes (no trailing None). Every
# leaf but the bias is large enough for 8-bit blocks; along a sharded last
# axis each shard holds whole blocks (a multiple of _blockwise.BLOCK).
INT8_LAYOUT = {
    "embedding": ((256, 64), P("fsdp")),
    "kernel": ((16, 4096), P(None, "fsdp")),
    "stacked": ((2, 64, 256), P(None, "fsdp")),
    "vector": ((8192,), P("fsdp")),
    "bias": ((128,), P("fsdp")),  # below _blockwise.MIN_SIZE: float32 state
}
INT8_FLOAT32_LEAVES = ("bias",)
# A control: shards of 128 elements along the last axis cut 256-element
# blocks in two, so block scales need communication.
INT8_STRADDLING = {"straddling": ((16, 1024), P(None, "fsdp"))}


def int8_solver(**options: Any) -> optax.GradientTransformation:
  return optax_amsgrad.amsgrad(1e-2, mu_dtype="int8", nu_dtype="int8", **options)


def int8_params(mesh: jax.sharding.Mesh | None, layout: dict[str, Any]) -> dict[str, jax.Array]:
  """Distinct values per element (a gradient of their sine spans decades
  within a block); on ``mesh`` with ``layout``'s specs, or on one device."""
  params = {}
  for name, (shape, spec) in layout.items():
    value = jnp.linspace(-1, 1, int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
    where = (_placement._as_returned(NamedSharding(mesh, spec), len(shape))
             if mesh is not None else jax.devices()[0])
    params[name] = jax.device_put(value, where)
  return params


def int8_grads(params: Any, t: jax.Array) -> Any:
  return jax.tree.map(lambda p: jnp.sin(7 * p + t) * (1 + t) * jnp.exp(-8 * p * p), params)


def int8_leaves(state: Any) -> list[tuple[str, str, Any]]:
  """(param name, buffer/part, array) of every moment leaf: ``codes`` and
  ``exponents`` of an 8-bit leaf, ``value`` of a plain one."""
  found = []
  for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax_amsgrad.ScaleByAmsgradState)
  ):
    if not isinstance(node, optax_amsgrad.ScaleByAmsgradState):
      continue
    for buffer in ("mu", "nu", "nu_max"):
      for name, leaf in getattr(node, buffer).items():
        if _blockwise.is_quantized(leaf):
          found += [(name, f"{buffer}/codes", leaf.codes),
                    (name, f"{buffer}/exponents", leaf.exponents)]
        else:
          found.append((name, f"{buffer}/value", leaf))
  assert found, "no ScaleByAmsgradState in the state"
  return found


def check_int8(report: dict[str, Any]) -> None:
  """8-bit state on fully sharded params: which leaves are 8-bit, whether
  codes and block exponents are sharded like their param (eager and jitted
  init, and after a step), the collectives of the compiled donated step and
  apply_step, compiles over a loop, and the state after five steps against
  one device, bit for bit."""
  results: dict[str, Any] = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    for layout_name, layout in (("fsdp", INT8_LAYOUT), ("straddling", INT8_STRADDLING)):
      if layout_name == "straddling" and axis_type == AxisType.Explicit:
        continue
      opt = int8_solver()
      params = int8_params(mesh, layout)
      entry: dict[str, Any] = {}
      state = opt.init(params)
      entry["eight_bit"] = {
          buffer: sorted(name for name, part, _ in int8_leaves(state)
                         if part == f"{buffer}/codes")
          for buffer in ("mu", "nu", "nu_max")
      }
      for way, init_state in (("eager", state), ("jit", jax.jit(opt.init)(params))):
        entry[f"placement/{way}"] = [
            f"{name} {part}: {x.sharding.spec} != {params[name].sharding.spec}"
            for name, part, x in int8_leaves(init_state)
            if not same_layout(x.sharding, params[name].sharding, x.ndim)
        ]

      def step(params, state, grads, opt=opt):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      donated = jax.jit(step, donate_argnums=(0, 1))
      entry["collectives"] = count_collectives(
          donated.lower(params, state, params).compile().as_text())
      entry["apply_step_collectives"] = count_collectives(jax.jit(
          lambda p, s, g, opt=opt: optax_amsgrad.apply_step(opt, g, s, p),
          donate_argnums=(0, 1),
      ).lower(params, state, params).compile().as_text())
      if layout_name == "fsdp":
        # Three donated steps from the eager init: one executable.
        @jax.jit
        def loop_step(params, state, t, opt=opt):
          return step(params, state, int8_grads(params, t), opt)

        carry = (params, opt.init(params))
        for t in range(3):
          carry = loop_step(*carry, jnp.float32(t))
        entry["loop_compiles"] = loop_step._cache_size()
        entry["placement/after_steps"] = [
            f"{name} {part}: {x.sharding.spec} != {params[name].sharding.spec}"
            for name, part, x in int8_leaves(carry[1])
            if not same_layout(x.sharding, params[name].sharding, x.ndim)
        ]
      results[f"{axis_type.name}/{layout_name}"] = entry

  # Sharded against one device: stochastic rounding (the default) and
  # round-to-nearest, five steps of the same gradients.
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  for rounding in ("stochastic", "nearest"):
    opt = int8_solver(state_rounding=rounding)
    states = {}
    for where, on in (("sharded", mesh), ("single", None)):
      params = int8_params(on, INT8_LAYOUT)

      @jax.jit
      def apply(params, state, t, opt=opt):
        return optax_amsgrad.apply_step(opt, int8_grads(params, t), state, params)

      state = opt.init(params)
      for t in range(5):
        params, state = apply(params, state, jnp.float32(t))
      states[where] = {f"{name}/{part}": np.asarray(x) for name, part, x in int8_leaves(state)}
      states[where].update({f"params/{k}": np.asarray(v) for k, v in params.items()})
    sharded, single = states["sharded"], states["single"]
    assert sharded.keys() == single.keys()
    results[f"identical/{rounding}"] = {
        "differ": {k: int(np.sum(sharded[k] != single[k])) for k in single},
        "elements": {k: int(single[k].size) for k in single},
        # The run is not trivial: codes are spread over many values.
        "distinct_codes": {k: len(np.unique(v)) for k, v in single.items()
                           if k.endswith("/codes")},
    }
  report["int8"] = results


def check_data_parallel(report: dict[str, Any], out: Path) -> None:
  """The example's training on one device and on eight, both layouts."""
  example = load_example("data_parallel")
  devices = jax.devices()
  results = {}
  for name, run_devices, layout in (
      ("single", devices[:1], "replicated"),
      ("replicated", devices, "replicated"),
      ("fsdp", devices, "fsdp"),
  ):
    params, facts = example.train(run_devices, layout)
    np.savez(out / f"params_{name}.npz", **params)
    results[name] = facts
  report["data_parallel"] = results


def main() -> None:
  out = Path(sys.argv[1])
  assert jax.device_count() == 8, jax.devices()
  report: dict[str, Any] = {}
  check_init(report)
  check_steps(report)
  check_fsdp_collectives(report)
  check_sharded_rounding(report)
  check_int8(report)
  check_data_parallel(report, out)
  (out / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
