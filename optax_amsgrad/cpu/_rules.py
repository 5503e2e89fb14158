"""The handler calls' rules, and where each leaf's step runs: the handlers or XLA.

On XLA:CPU, for the dtypes they cover, compiled handlers (``_ffi``)
update ``m``, ``v`` and ``v_max`` (and, for ``apply_step``, the params) of many
leaves in one pass; elsewhere XLA computes ``_math``'s arithmetic. Both
evaluate the same operations in the same order; XLA:CPU may contract
``a * b + c`` into a fused multiply-add where the handlers do not, so the two
agree to within a rounding of each operation (tests/test_ffi.py).

A handler is an opaque call to XLA, so it brings its own rules: under vmap it
takes the batch as leading rows, on sharded arrays it runs on each shard where
the arrays live (no gathering), like the elementwise XLA path, and its
derivative is the XLA path's.

8-bit leaves (``_blockwise``) go to the blockwise handlers when all three
buffers are 8-bit and the computation has one device: their blocks run along
the last axis, which a sharding may cut, so sharded 8-bit leaves stay with
XLA's partitioner. The handlers store the XLA path's codes (the same integer
operations on moments that agree to a rounding, tests/test_cpu_kernel.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from optax_amsgrad import _blockwise, _rounding
from optax_amsgrad._math import (
  Direction,
  MomentCoefficients,
  Rounding,
  Step,
  compute_dtypes,
  leaf_step,
  xla_stepped,
)
from optax_amsgrad.cpu import _ffi


def kernel_signature(
    g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array, p: jax.Array | None = None
) -> tuple[Any, ...] | None:
  """The dtypes that put a leaf in a handler call, or None where the CPU
  handlers do not cover it (complex, float16, mixed precision other than
  bfloat16 storage, params outside the compute dtype for the step, inside
  ``shard_map``; 8-bit state unless all three buffers are 8-bit and float32
  params live on the only device)."""
  if jax.sharding.get_abstract_mesh().manual_axes:
    # Inside shard_map each device already holds its own block: the XLA path
    # updates it there, where the handlers' partitioning rules do not apply.
    return None
  quantized = [_blockwise.is_quantized(x) for x in (m, v, v_max)]
  if any(quantized):
    # The blockwise handlers have no partitioning rule: a sharded leaf's
    # blocks are cut by XLA's partitioner, on the XLA path.
    if not all(quantized) or jax.device_count() != 1:
      return None
    if _blockwise.MAX_ROUNDING != "nearest":
      # The handlers round nu_max to nearest only ("up" is for measurement).
      return None
    if not _ffi.supports_blockwise(g.dtype, None if p is None else p.dtype):
      return None
    return ("blockwise", p is not None)
  _, v_dtype = compute_dtypes(g.dtype)
  if p is not None and not (p.dtype == g.dtype == v_dtype):
    return None
  if v_max.dtype != v.dtype or not _ffi.supports(v_dtype, g.dtype, m.dtype, v.dtype):
    return None
  return (v_dtype, g.dtype, m.dtype, v.dtype, p is not None)


def stored_together(
    c: MomentCoefficients,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    stochastic: bool,
    seed: jax.Array,
    step_count: jax.Array,
    leaf_indices: Sequence[int],
) -> list[tuple[jax.Array, ...]]:
  """The stored ``(m, v, v_max)`` of leaves ``(g, m, v, v_max)`` that share a
  ``kernel_signature``: one handler call for all of them on XLA:CPU, the XLA
  path elsewhere."""
  call = _KernelCall(stochastic, tuple(leaf_indices), False, (False,) * len(leaves),
                     _blockwise.is_quantized(leaves[0][1]))
  return _dispatch(call, c._asdict(), seed, step_count, leaves)


def updated_together(
    c: MomentCoefficients,
    d: Direction,
    leaves: Sequence[tuple[jax.Array, Any, Any, Any]],
    *,
    stochastic: bool,
    seed: jax.Array,
    step_count: jax.Array,
    leaf_indices: Sequence[int],
) -> list[tuple[jax.Array, ...]]:
  """:func:`stored_together` for 8-bit leaves, with the update from the
  stored moments: ``(u, m, v, v_max)``, the update written over ``g`` where
  XLA can."""
  call = _KernelCall(stochastic, tuple(leaf_indices), False, (False,) * len(leaves),
                     blockwise=True, update=True)
  return _dispatch(call, {**c._asdict(), **d._asdict()}, seed, step_count, leaves)


def stepped_together(
    c: MomentCoefficients,
    d: Direction,
    step_size: jax.Array,
    weight_decay: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    decay: Sequence[bool],
    stochastic: bool,
    seed: jax.Array,
    step_count: jax.Array,
    leaf_indices: Sequence[int],
) -> list[tuple[jax.Array, ...]]:
  """``(p, m, v, v_max)`` after the step for leaves ``(g, p, m, v, v_max)``
  that share a ``kernel_signature``: one pass over all of them on XLA:CPU,
  the XLA path elsewhere."""
  call = _KernelCall(stochastic, tuple(leaf_indices), True, tuple(bool(x) for x in decay),
                     _blockwise.is_quantized(leaves[0][2]))
  values = {**c._asdict(), **d._asdict(), "step_size": step_size,
            "weight_decay": weight_decay}
  return _dispatch(call, values, seed, step_count, leaves)


class _KernelCall(NamedTuple):
  """The static part of one handler call."""

  stochastic: bool
  leaf_indices: tuple[int, ...]
  apply: bool
  decay: tuple[bool, ...]
  # m, v and v_max are 8-bit blocks, each passed as its codes and exponents.
  blockwise: bool = False
  # Without params, the update is a result too (8-bit blocks only).
  update: bool = False

  @property
  def arrays_per_leaf(self) -> int:
    return (5 if self.apply else 4) + (3 if self.blockwise else 0)

  @property
  def results_per_leaf(self) -> int:
    return self.arrays_per_leaf - (0 if self.update else 1)

  def subset(self, positions: Sequence[int]) -> _KernelCall:
    return self._replace(leaf_indices=tuple(self.leaf_indices[i] for i in positions),
                         decay=tuple(self.decay[i] for i in positions))

  def flatten(self, leaf: Sequence[Any]) -> tuple[jax.Array, ...]:
    """One leaf's operands or results as the handler takes them: an 8-bit
    buffer as its codes and exponents."""
    if not self.blockwise:
      return tuple(leaf)
    return tuple(a for x in leaf
                 for a in ((x.codes, x.exponents) if _blockwise.is_quantized(x) else (x,)))

  def unflatten(self, arrays: Sequence[Any]) -> tuple[Any, ...]:
    """:meth:`flatten` undone: the last three buffers of the leaf, regrouped."""
    if not self.blockwise:
      return tuple(arrays)
    head = len(arrays) - 6
    return (*arrays[:head], *(_blockwise.Quantized(arrays[i], arrays[i + 1])
                              for i in range(head, len(arrays), 2)))


# The scalar operands of a handler call: every coefficient, then seed and
# count; the arrays of each leaf follow (g, [p,] m, v, v_max).
_NUM_SCALARS = len(_ffi.COEFFICIENTS) + 2


def _on_platform(
    values: dict[str, jax.Array],
    seed: jax.Array,
    step_count: jax.Array,
    arrays: Sequence[jax.Array],
    *,
    kernel: Any,
    xla: Any,
) -> tuple[jax.Array, ...]:
  """``kernel`` on XLA:CPU, ``xla`` elsewhere (chosen when lowering: the
  handlers are registered for XLA:CPU only), on the handler's operands: the
  coefficients in the compute dtype (unnamed ones zero), seed, count, then
  ``arrays``."""
  dtype = compute_dtypes(arrays[0].dtype)[1]
  scalars = [jnp.asarray(values.get(name, 0), dtype) for name in _ffi.COEFFICIENTS]
  result: tuple[jax.Array, ...] = jax.lax.platform_dependent(
      *scalars, seed, step_count, *arrays, cpu=kernel, default=xla
  )
  return result


def _split_scalars(
    operands: Sequence[Any],
) -> tuple[dict[str, Any], Any, Any, Sequence[Any]]:
  """(coefficients by name, seed, count, arrays) of a handler's operands."""
  values = dict(zip(_ffi.COEFFICIENTS, operands, strict=False))
  seed, count = operands[_NUM_SCALARS - 2: _NUM_SCALARS]
  return values, seed, count, operands[_NUM_SCALARS:]


def _arithmetic(values: dict[str, Any]) -> tuple[MomentCoefficients, Direction]:
  """The named scalars of ``_math`` from the coefficients by name."""
  return (MomentCoefficients(**{k: values[k] for k in MomentCoefficients._fields}),
          Direction(**{k: values[k] for k in Direction._fields}))


def _stream_keys(
    seed: jax.Array, count: jax.Array, leaf_index: int | jax.Array
) -> jax.Array:
  """The stochastic-rounding stream keys of ``m`` and ``v``, ``[..., 2]``
  (``leaf_index`` broadcasts with ``seed`` and ``count``)."""
  return jnp.stack([_rounding.stream_key(seed, count, buffer, leaf_index)
                    for buffer in ("mu", "nu")], axis=-1)


def _split(
    call: _KernelCall, operands: Sequence[Any]
) -> tuple[dict[str, Any], Any, Any, list[tuple[Any, ...]]]:
  values, seed, count, arrays = _split_scalars(operands)
  n = call.arrays_per_leaf
  leaves = [tuple(arrays[i: i + n]) for i in range(0, len(arrays), n)]
  return values, seed, count, leaves


def _dispatch(
    call: _KernelCall,
    values: dict[str, jax.Array],
    seed: jax.Array,
    step_count: jax.Array,
    leaves: Sequence[tuple[jax.Array, ...]],
) -> list[tuple[jax.Array, ...]]:
  flat = _on_platform(
      values, seed, step_count, [x for leaf in leaves for x in call.flatten(leaf)],
      kernel=_kernel_function(call), xla=functools.partial(_xla_call, call),
  )
  n = call.results_per_leaf
  return [call.unflatten(flat[i: i + n]) for i in range(0, len(flat), n)]


def _xla_call(
    call: _KernelCall, *operands: jax.Array,
    indices: Sequence[jax.Array | None] | None = None,
) -> tuple[jax.Array, ...]:
  """What the handler computes, by XLA, from the handler's operands (flat
  results). ``indices`` gives each leaf's global element positions."""
  values, seed, count, leaves = _split(call, operands)
  c, d = _arithmetic(values)
  step_scalars = (values["step_size"], values["weight_decay"]) if call.apply else None
  # All leaves' keys hashed at once: per leaf, tracing the hash op by op
  # costs seconds over a model's hundreds of leaves.
  keys: list[_rounding.StreamKeys | None] = (
      list(_rounding.tree_stream_keys(seed, count, call.leaf_indices, complex_parts=False))
      if call.stochastic else [None] * len(leaves))
  out: list[jax.Array] = []
  for i, leaf in enumerate(leaves):
    g, *rest = call.unflatten(leaf)
    p, (m, v, v_max) = (rest[0], rest[1:]) if call.apply else (None, rest)
    out.extend(call.flatten(leaf_step(
        c, d, step_scalars, g, p, m, v, v_max, keys[i],
        None if indices is None else indices[i],
        stochastic=call.stochastic, split_complex=False, decay=call.apply and call.decay[i],
        with_update=call.update,
    )))
  return tuple(out)


def _needs_keys(stochastic: bool, g: Any, m: Any, v: Any) -> bool:
  """Whether storing ``m`` or ``v`` (arrays, or 8-bit blocks) rounds
  stochastically."""
  _, v_dtype = compute_dtypes(g.dtype)
  return stochastic and (
      _blockwise.is_narrowing(v_dtype, m) or _blockwise.is_narrowing(v_dtype, v)
  )


def _call_kernel(call: _KernelCall, *operands: jax.Array) -> tuple[jax.Array, ...]:
  """The handler on arrays with optional leading batch dimensions, shared by
  every scalar (one row per batch element)."""
  values, seed, count, leaves = _split(call, operands)
  g, *_, m, v, _ = call.unflatten(leaves[0])
  dtype = compute_dtypes(g.dtype)[1]
  packed = _ffi.pack(values, dtype)
  batch = packed.shape[:-1]
  if _needs_keys(call.stochastic, g, m, v):
    # All leaves' keys at once: [..., leaves, 2]. Stacked from scalars: a
    # partitioned function may not capture an array constant.
    positions = jnp.stack([jnp.uint32(i) for i in call.leaf_indices])
    keys = _stream_keys(seed[..., None], count[..., None], positions)
  else:
    keys = jnp.zeros((*batch, len(leaves), 2), jnp.uint32)
  if call.blockwise:
    results = _ffi.blockwise(packed, keys, leaves, stochastic=call.stochastic,
                             decay=call.decay if call.apply else None, update=call.update)
  elif call.apply:
    results = _ffi.step(packed, keys, leaves,
                               stochastic=call.stochastic, decay=call.decay)
  else:
    results = _ffi.moments(packed, keys, leaves,
                                  stochastic=call.stochastic)
  return tuple(x for leaf in results for x in leaf)


def _with_rules(
    primal: Any, batched_call: Any, xla_call: Any
) -> Any:
  """``primal`` (a handler call) with a vmap rule, ``batched_call`` on the
  operands with the batch as their leading axis (the handlers take it as
  rows), and a JVP, that of ``xla_call`` (for meta-gradients)."""

  @jax.custom_batching.custom_vmap
  def batchable(*operands: jax.Array) -> tuple[jax.Array, ...]:
    result: tuple[jax.Array, ...] = primal(*operands)
    return result

  @batchable.def_vmap
  def batched(
      axis_size: int, in_batched: list[bool], *operands: jax.Array
  ) -> tuple[tuple[jax.Array, ...], tuple[bool, ...]]:
    # custom_vmap puts the batch axis first. Sharding rules do not apply to a
    # vmapped call: XLA places it like any opaque call.
    operands = tuple(
        x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
        for x, is_batched in zip(operands, in_batched, strict=True)
    )
    out: tuple[jax.Array, ...] = batched_call(*operands)
    return out, (True,) * len(out)

  @jax.custom_jvp
  def differentiable(*operands: jax.Array) -> tuple[jax.Array, ...]:
    result: tuple[jax.Array, ...] = batchable(*operands)
    return result

  @differentiable.defjvp
  def derivative(
      primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
  ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    result: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] = jax.jvp(
        xla_call, primals, tangents
    )
    return result

  return differentiable


@functools.cache
def _kernel_function(call: _KernelCall) -> Any:
  """The handler with its rules: sharding (each device updates its shards),
  vmap and differentiation. Blockwise calls have no sharding rule: they are
  made on one device only (``kernel_signature``)."""
  return _with_rules(
      functools.partial(_call_kernel, call) if call.blockwise else _kernel_partitioned(call),
      functools.partial(_call_kernel, call),
      functools.partial(_xla_call, call),
  )


def _global_index(
    global_shape: tuple[int, ...], spec: PartitionSpec, mesh: Any
) -> jax.Array:
  """The global flat (row-major) position of each element of this device's
  shard, from the mesh coordinates of the device (inside a partitioned
  lowering, where ``axis_index`` names the mesh axes)."""
  spec_entries = tuple(spec) + (None,) * (len(global_shape) - len(spec))
  local_shape = []
  offsets = []
  for size, entry in zip(global_shape, spec_entries, strict=True):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    shards = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    position = jnp.uint32(0)
    for axis in axes:
      position = position * jnp.uint32(mesh.shape[axis]) + jax.lax.axis_index(
          axis
      ).astype(jnp.uint32)
    local_shape.append(size // shards)
    offsets.append(position * jnp.uint32(size // shards))
  strides = np.cumprod((1, *global_shape[:0:-1]), dtype=np.int64)[::-1]
  index = jnp.zeros(local_shape, jnp.uint32)
  for d, (offset, stride) in enumerate(zip(offsets, strides, strict=True)):
    position_d = jax.lax.broadcasted_iota(jnp.uint32, tuple(local_shape), d) + offset
    index = index + position_d * jnp.uint32(int(stride) & 0xFFFFFFFF)
  return index


@functools.cache
def _kernel_partitioned(call: _KernelCall) -> Any:
  """The handler as a custom partitioning: each device updates its shards of
  the state where they live, like the elementwise XLA path."""
  partitioned = custom_partitioning(  # type: ignore[no-untyped-call]
      functools.partial(_call_kernel, call)
  )
  per_leaf = call.arrays_per_leaf

  def leaf_shardings(mesh: Any, arg_shapes: Any) -> list[Any]:
    # Each leaf's state sharding (of m) decides: its g (and p) follow, so the
    # state never moves. Shardings without a mesh (rare) are replicated.
    _, _, _, leaves = _split(call, arg_shapes)
    shardings = []
    for leaf in leaves:
      sharding = leaf[-3].sharding
      if not isinstance(sharding, NamedSharding):
        sharding = NamedSharding(mesh, PartitionSpec())  # type: ignore[no-untyped-call]
      shardings.append(sharding)
    return shardings

  def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    return tuple(s for s in leaf_shardings(mesh, arg_shapes) for _ in range(per_leaf - 1))

  def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    shardings = leaf_shardings(mesh, arg_shapes)
    _, _, _, leaves = _split(call, arg_shapes)
    # The random bits depend on each element's position in the whole leaf;
    # the handler knows only the shard, so shards that round stochastically
    # are rounded by XLA, with their global positions.
    in_xla = [
        any(entry is not None for entry in sharding.spec)
        and _needs_keys(call.stochastic, leaf[0], leaf[-3], leaf[-2])
        for sharding, leaf in zip(shardings, leaves, strict=True)
    ]
    on_kernel = [i for i, x in enumerate(in_xla) if not x]
    on_xla = [i for i, x in enumerate(in_xla) if x]

    def lower(*operands: jax.Array) -> tuple[jax.Array, ...]:
      scalars = operands[:_NUM_SCALARS]
      _, _, _, local = _split(call, operands)
      results: list[Any] = [None] * len(local)
      indices = [_global_index(leaves[i][0].shape, shardings[i].spec, mesh)
                 for i in on_xla]
      n = per_leaf - 1
      for positions, run in (
          (on_kernel, _call_kernel),
          (on_xla, functools.partial(_xla_call, indices=indices)),
      ):
        if not positions:
          continue
        flat = run(call.subset(positions), *scalars,
                   *(x for i in positions for x in local[i]))
        for k, i in enumerate(positions):
          results[i] = tuple(flat[k * n: (k + 1) * n])
      return tuple(x for leaf in results for x in leaf)

    scalar = NamedSharding(mesh, PartitionSpec())  # type: ignore[no-untyped-call]
    arg_shardings = (scalar,) * _NUM_SCALARS + tuple(
        s for s in shardings for _ in range(per_leaf)
    )
    result_shardings = tuple(s for s in shardings for _ in range(per_leaf - 1))
    return mesh, lower, result_shardings, arg_shardings

  def rule(mesh: Any, value_types: Any, result_types: Any) -> str:
    operands = [""] * _NUM_SCALARS
    results = []
    arrays = value_types[_NUM_SCALARS:]
    for leaf in range(len(arrays) // per_leaf):
      rank = len(arrays[leaf * per_leaf].shape)
      factors = " ".join(f"l{leaf}d{i}" for i in range(rank))
      operands += [factors] * per_leaf
      results += [factors] * (per_leaf - 1)
    return ", ".join(operands) + " -> " + ", ".join(results)

  partitioned.def_partition(  # type: ignore[no-untyped-call]
      partition=partition,
      infer_sharding_from_operands=infer,
      sharding_rule=rule,
  )
  return partitioned


class _FlatCall(NamedTuple):
  """The static part of one call with a flat state (``flatten_by_dtype``):
  the position of the flat buffer in the state's dict, and one weight-decay
  flag for all its leaves."""

  stochastic: bool
  leaf_index: int
  decay: bool


def stepped_flat(
    c: MomentCoefficients,
    d: Direction,
    step_size: jax.Array,
    weight_decay: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array]],
    state: tuple[jax.Array, jax.Array, jax.Array],
    *,
    decay: bool,
    stochastic: bool,
    seed: jax.Array,
    step_count: jax.Array,
    leaf_index: int,
) -> tuple[list[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """The params after the step for leaves ``(g, p)`` whose state is the flat
  ``(m, v, v_max)`` holding them all, raveled, in order: one pass on XLA:CPU;
  elsewhere XLA on the raveled leaves, as ``flatten_by_dtype`` computes."""
  call = _FlatCall(stochastic, leaf_index, decay)
  values = {**c._asdict(), **d._asdict(), "step_size": step_size,
            "weight_decay": weight_decay}
  flat = _on_platform(
      values, seed, step_count, [*(x for leaf in leaves for x in leaf), *state],
      kernel=_flat_kernel_function(call), xla=functools.partial(_flat_xla_call, call),
  )
  n = len(leaves)
  m, v, v_max = flat[n:]
  return list(flat[:n]), (m, v, v_max)


def _split_flat(
    operands: Sequence[Any],
) -> tuple[dict[str, Any], Any, Any, list[Any], list[Any], tuple[Any, ...]]:
  values, seed, count, arrays = _split_scalars(operands)
  pairs, state = arrays[:-3], tuple(arrays[-3:])
  return values, seed, count, list(pairs[0::2]), list(pairs[1::2]), state


def _flat_xla_call(call: _FlatCall, *operands: jax.Array) -> tuple[jax.Array, ...]:
  """What the flat handler computes, by XLA: the step on the raveled leaves,
  then the params cut back into their shapes."""
  values, seed, count, gs, ps, (m, v, v_max) = _split_flat(operands)
  c, d = _arithmetic(values)
  step = Step(values["step_size"], values["weight_decay"], call.decay)
  rounding = Rounding(call.stochastic, _rounding.stream_keys(seed, count, call.leaf_index))
  batch = jnp.ndim(m) - 1  # leading vmap dimensions are not raveled

  def ravel(xs: list[jax.Array]) -> jax.Array:
    parts = [x.reshape(*x.shape[:batch], -1) for x in xs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

  new_p, new_m, new_v, new_v_max = xla_stepped(
      c, d, step, ravel(gs), ravel(ps), m, v, v_max, rounding=rounding,
      split_complex=False,
  )
  sizes = [int(np.prod(p.shape[batch:], dtype=np.int64)) for p in ps]
  cuts = np.cumsum(sizes)[:-1].tolist()
  pieces = jnp.split(new_p, cuts, axis=-1) if cuts else [new_p]
  return (*(piece.reshape(p.shape) for piece, p in zip(pieces, ps, strict=True)),
          new_m, new_v, new_v_max)


def _flat_call_kernel(call: _FlatCall, *operands: jax.Array) -> tuple[jax.Array, ...]:
  values, seed, count, gs, ps, (m, v, v_max) = _split_flat(operands)
  dtype = compute_dtypes(gs[0].dtype)[1]
  packed = _ffi.pack(values, dtype)
  if _needs_keys(call.stochastic, gs[0], m, v):
    keys = _stream_keys(seed, count, call.leaf_index)
  else:
    keys = jnp.zeros((*packed.shape[:-1], 2), jnp.uint32)
  new_ps, state = _ffi.flat_step(
      packed, keys, list(zip(gs, ps, strict=True)), (m, v, v_max),
      stochastic=call.stochastic, decay=[call.decay] * len(gs),
  )
  return (*new_ps, *state)


@functools.cache
def _flat_kernel_function(call: _FlatCall) -> Any:
  """The flat handler with its vmap and differentiation rules. A flat state
  is not meant for sharded params: the handler runs on the whole arrays, as
  the raveling on the XLA path would."""
  kernel = functools.partial(_flat_call_kernel, call)
  return _with_rules(kernel, kernel, functools.partial(_flat_xla_call, call))
