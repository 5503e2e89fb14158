"""The new stored moments of one leaf, and where they are computed.

On XLA:CPU, for the dtypes it covers, a compiled handler (``_cpu_kernel``)
updates ``m``, ``v`` and ``v_max`` in one pass; elsewhere XLA does, in three.
Both evaluate the same operations in the same order; XLA:CPU may contract
``a * b + c`` into a fused multiply-add where the handler does not, so the two
agree to within a rounding of each operation (tests/test_cpu_kernel.py).

The handler is an opaque call to XLA, so it brings its own rules: under vmap
it takes the batch as leading rows, and on sharded arrays it runs on each
shard where the arrays live (no gathering), like the elementwise XLA path.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from optax_amsgrad import _cpu_kernel, _rounding


class MomentCoefficients(NamedTuple):
  """The scalars of the moment update, in the real compute dtype."""

  b1: jax.Array
  b2: jax.Array
  one_minus_b1: jax.Array
  one_minus_b2: jax.Array
  nu_max_scale: jax.Array


class Direction(NamedTuple):
  """The scalars of the AMSGrad direction ``m * numerator / (sqrt(v_max *
  denominator + eps_root) + eps)``, in the real compute dtype."""

  eps: jax.Array
  eps_root: jax.Array
  numerator: jax.Array
  denominator: jax.Array


class Step(NamedTuple):
  """How the direction ``u`` moves the params, as ``amsgrad``/``amsgradw``
  chain it: ``p + step_size * (u + weight_decay * p)``, the decay only where
  ``decay``; each operation rounded in the params' dtype."""

  step_size: jax.Array
  weight_decay: jax.Array
  decay: bool


class Rounding(NamedTuple):
  """How one leaf's moments are stored: the ``state_rounding`` mode, the
  seed and step of the random bits, and the leaf's position in the tree."""

  stochastic: bool
  seed: jax.Array
  step_count: jax.Array
  leaf_index: int


def saturate(g: jax.Array, real_dtype: jnp.dtype) -> jax.Array:
  """``g`` with every finite magnitude above ``sqrt(finfo.max) / 2`` brought
  down to it (complex values keep their phase); inf and NaN pass unchanged.

  ``|g|**2`` is then at most a quarter of the largest float, and so are ``v``
  and every intermediate of the update (``v / (1 - b2**t) <= max |g|**2``),
  so no overflow can turn ``v_max`` into inf and the update into 0 for good.
  Below the limit (9.2e18 in float32, 6.7e153 in float64) ``g`` is untouched.
  """
  limit = float(np.sqrt(np.finfo(real_dtype).max)) / 2
  if not jnp.iscomplexobj(g):
    return jnp.where(jnp.isinf(g), g, jnp.clip(g, -limit, limit))
  magnitude = jnp.abs(g)
  large = (magnitude > limit) & ~jnp.isinf(magnitude)
  # The inner where keeps limit / magnitude finite (and its derivative) where
  # the outer one does not take it.
  safe = jnp.where(large, magnitude, limit)
  return jnp.where(large, g * (limit / safe).astype(g.dtype), g)


def moments(
    g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array, c: MomentCoefficients
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The new moments ``m``, ``v`` and ``max(v_max, v * nu_max_scale)`` of one
  leaf, in the compute dtype. Complex ``g`` and ``m`` use ``|g|**2`` for the
  second moment, as Optax does. Gradients too large for their square to be
  represented are saturated first (see ``saturate``); the step depends on
  ``m / sqrt(v_max)``, so an isolated huge gradient still gives the step exact
  arithmetic would."""
  g = saturate(g, c.b2.dtype)
  m = c.b1 * m + c.one_minus_b1 * g
  v = c.b2 * v + c.one_minus_b2 * (g.real * g.real + g.imag * g.imag
                               if jnp.iscomplexobj(g) else g * g)
  v_max = jnp.maximum(v_max, v * c.nu_max_scale)
  return m, v, v_max


def direction(m: jax.Array, v_max: jax.Array, d: Direction) -> jax.Array:
  """The AMSGrad direction from the new (stored) ``m`` and ``v_max``."""
  return m * d.numerator / (jnp.sqrt(v_max * d.denominator + d.eps_root) + d.eps)


def apply_step(u: jax.Array, p: jax.Array, step: Step) -> jax.Array:
  """The params after the step, with the operations of Optax's
  ``add_decayed_weights``, ``scale_by_learning_rate`` and ``apply_updates``."""
  if step.decay:
    u = u + step.weight_decay.astype(u.dtype) * p
  u = step.step_size.astype(u.dtype) * u
  return jnp.asarray(p + u).astype(p.dtype)


def real_dtype(dtype: jnp.dtype) -> jnp.dtype:
  return jnp.finfo(dtype).dtype  # type: ignore[no-untyped-call]


def compute_dtypes(param_dtype: jnp.dtype) -> tuple[jnp.dtype, jnp.dtype]:
  """(dtype of m and the update, real dtype of v): at least float32."""
  real = jnp.promote_types(real_dtype(param_dtype), jnp.float32)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return jnp.promote_types(real, jnp.complex64), real
  return real, real


def xla_stored(
    c: MomentCoefficients,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored ``m``, ``v`` and ``v_max`` of one leaf, computed by XLA.

  ``index`` is the global flat position of each element for the random bits
  (by default its position in ``g``); ``split_complex`` keeps one second
  moment per real coordinate of complex params, as PyTorch does.
  """
  m_dtype, v_dtype = compute_dtypes(g.dtype)
  g_c = g.astype(m_dtype)
  m_c = m.astype(m_dtype)
  if split_complex and jnp.iscomplexobj(g):
    v_c, v_max_c = v.astype(m_dtype), v_max.astype(m_dtype)
    parts = [
        moments(part(g_c), part(m_c), part(v_c), part(v_max_c), c)
        for part in (jnp.real, jnp.imag)
    ]
    new_m, new_v, new_v_max = (
        jax.lax.complex(re, im) for re, im in zip(*parts, strict=True)
    )
  else:
    new_m, new_v, new_v_max = moments(
        g_c, m_c, v.astype(v_dtype), v_max.astype(v_dtype), c
    )

  def store(x: jax.Array, like: jax.Array, buffer: str) -> jax.Array:
    return _rounding.store(
        x, like.dtype, stochastic=rounding.stochastic, seed=rounding.seed,
        count=rounding.step_count, buffer=buffer, leaf_index=rounding.leaf_index,
        index=index,
    )

  # nu_max is rounded to nearest (never to zero), which is monotone: the
  # stored value is the rounded true maximum (of v and of the stored nu, so
  # nu <= nu_max holds in the state), never below the previous one and never
  # ratcheted upwards by rounding noise.
  stored_m = store(new_m, m, "mu")
  stored_v = store(new_v, v, "nu")
  stored_v_max = _rounding.store_max(
      new_v_max, v_max.dtype, stochastic=rounding.stochastic,
      at_least=stored_v, scale=c.nu_max_scale,
  )
  if not rounding.stochastic and v.dtype != new_v.dtype and not jnp.iscomplexobj(v):
    # A no-op (nu_max is never negative) that orders the store of nu after
    # the nu_max kernel, the last one to read the old nu: without it XLA
    # copies the old, donated nu before overwriting it. Not with stochastic
    # rounding, where the nu_max kernel also reads the stored nu: XLA then
    # keeps the rounded nu in a temporary of the same size and an extra pass,
    # slower than the copy.
    stored_v = jnp.where(stored_v_max < 0, stored_v_max, stored_v)
  return stored_m, stored_v, stored_v_max


def kernel_supports(
    g: jax.Array, m: jax.Array, v: jax.Array, v_max: jax.Array, p: jax.Array | None = None
) -> bool:
  """Whether the CPU handlers cover this leaf (real dtypes they are built
  for; for the step, params and gradients in the compute dtype)."""
  _, v_dtype = compute_dtypes(g.dtype)
  if p is not None and not (p.dtype == g.dtype == v_dtype):
    return False
  return v_max.dtype == v.dtype and _cpu_kernel.supports(v_dtype, g.dtype, m.dtype, v.dtype)


def stored(
    c: MomentCoefficients,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored ``m``, ``v`` and ``v_max`` of one leaf: by the CPU handler
  when the leaf is compiled for XLA:CPU and the handler covers its dtypes,
  by XLA otherwise."""
  if not kernel_supports(g, m, v, v_max):
    return xla_stored(c, g, m, v, v_max, rounding=rounding, split_complex=split_complex)
  call = _KernelCall(rounding.stochastic, rounding.leaf_index, apply=False, decay=False)
  values = c._asdict()
  return _dispatch(call, values, rounding, (g, m, v, v_max))  # type: ignore[return-value]


def stepped(
    c: MomentCoefficients,
    d: Direction,
    step: Step,
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The params after the step and the stored ``m``, ``v`` and ``v_max``: in
  one pass by the CPU handler where it covers the leaf, by XLA otherwise."""
  if not kernel_supports(g, m, v, v_max, p):
    return _xla_stepped(c, d, step, g, p, m, v, v_max, rounding=rounding,
                        split_complex=split_complex)
  call = _KernelCall(rounding.stochastic, rounding.leaf_index, apply=True, decay=step.decay)
  values = {**c._asdict(), **d._asdict(), "step_size": step.step_size,
            "weight_decay": step.weight_decay}
  return _dispatch(call, values, rounding, (g, p, m, v, v_max))  # type: ignore[return-value]


def _xla_stepped(
    c: MomentCoefficients,
    d: Direction,
    step: Step,
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    rounding: Rounding,
    split_complex: bool,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  new_m, new_v, new_v_max = xla_stored(
      c, g, m, v, v_max, rounding=rounding, split_complex=split_complex, index=index
  )
  u = update_from_stored(new_m, new_v_max, d, g.dtype, split_complex=split_complex)
  return apply_step(u, p, step), new_m, new_v, new_v_max


def update_from_stored(
    m: jax.Array, v_max: jax.Array, d: Direction, dtype: jnp.dtype, *, split_complex: bool
) -> jax.Array:
  """The direction from the stored moments, cast back up, in ``dtype``."""
  m_dtype, v_dtype = compute_dtypes(dtype)
  m_u = m.astype(m_dtype)
  if split_complex and jnp.iscomplexobj(m_u):
    v_max_u = v_max.astype(m_dtype)
    u = jax.lax.complex(
        *(direction(part(m_u), part(v_max_u), d) for part in (jnp.real, jnp.imag))
    )
  else:
    u = direction(m_u, v_max.astype(v_dtype), d)
  return u.astype(dtype)


class _KernelCall(NamedTuple):
  """The static part of one handler call."""

  stochastic: bool
  leaf_index: int
  apply: bool
  decay: bool


# The handler's scalar operands: every coefficient, then seed and count; the
# arrays follow (g, [p,] m, v, v_max).
_NUM_SCALARS = len(_cpu_kernel.COEFFICIENTS) + 2


def _dispatch(
    call: _KernelCall,
    values: dict[str, jax.Array],
    rounding: Rounding,
    arrays: tuple[jax.Array, ...],
) -> tuple[jax.Array, ...]:
  dtype = compute_dtypes(arrays[0].dtype)[1]
  scalars = [jnp.asarray(values.get(name, 0), dtype) for name in _cpu_kernel.COEFFICIENTS]
  operands = (*scalars, rounding.seed, rounding.step_count, *arrays)
  # Resolved when lowering: the handlers are registered for XLA:CPU only.
  result: tuple[jax.Array, ...] = jax.lax.platform_dependent(
      *operands,
      cpu=_kernel_function(call),
      default=functools.partial(_xla_call, call),
  )
  return result


def _xla_call(
    call: _KernelCall, *operands: jax.Array, index: jax.Array | None = None
) -> tuple[jax.Array, ...]:
  """What the handler computes, by XLA, from the handler's operands."""
  values = dict(zip(_cpu_kernel.COEFFICIENTS, operands, strict=False))
  seed, count = operands[_NUM_SCALARS - 2 : _NUM_SCALARS]
  arrays = operands[_NUM_SCALARS:]
  c = MomentCoefficients(**{k: values[k] for k in MomentCoefficients._fields})
  rounding = Rounding(call.stochastic, seed, count, call.leaf_index)
  if not call.apply:
    g, m, v, v_max = arrays
    return xla_stored(c, g, m, v, v_max, rounding=rounding, split_complex=False,
                      index=index)
  d = Direction(**{k: values[k] for k in Direction._fields})
  step = Step(values["step_size"], values["weight_decay"], call.decay)
  return _xla_stepped(c, d, step, *arrays, rounding=rounding, split_complex=False,
                      index=index)


def _needs_keys(stochastic: bool, g: Any, m: Any, v: Any) -> bool:
  _, v_dtype = compute_dtypes(g.dtype)
  return stochastic and (
      _rounding.is_narrowing(v_dtype, m.dtype) or _rounding.is_narrowing(v_dtype, v.dtype)
  )


def _state_arrays(call: _KernelCall, arrays: tuple[Any, ...]) -> tuple[Any, Any, Any]:
  """(m, v, v_max) among the array operands."""
  m, v, v_max = arrays[-3:]
  return m, v, v_max


def _call_kernel(call: _KernelCall, *operands: jax.Array) -> tuple[jax.Array, ...]:
  """The handler on arrays with optional leading batch dimensions, shared by
  every scalar (one row per batch element)."""
  dtype = compute_dtypes(operands[_NUM_SCALARS].dtype)[1]
  values = dict(zip(_cpu_kernel.COEFFICIENTS, operands, strict=False))
  packed = _cpu_kernel.pack(values, dtype)
  seed, count = operands[_NUM_SCALARS - 2 : _NUM_SCALARS]
  arrays = operands[_NUM_SCALARS:]
  m, v, _ = _state_arrays(call, arrays)
  if _needs_keys(call.stochastic, arrays[0], m, v):
    keys = jnp.stack(
        [_rounding.stream_key(seed, count, buffer, call.leaf_index)
         for buffer in ("mu", "nu")],
        axis=-1,
    )
  else:
    keys = jnp.zeros((*packed.shape[:-1], 2), jnp.uint32)
  if call.apply:
    return _cpu_kernel.step(packed, keys, *arrays, stochastic=call.stochastic,
                            decay=call.decay)
  return _cpu_kernel.moments(packed, keys, *arrays, stochastic=call.stochastic)


@functools.cache
def _kernel_function(call: _KernelCall) -> Any:
  """The handler with its rules: sharding (each device updates its shard),
  vmap (the batch as rows) and differentiation (the XLA path's derivative,
  for meta-gradients through the update)."""
  partitioned = _kernel_partitioned(call)

  @jax.custom_batching.custom_vmap
  def batchable(*operands: jax.Array) -> tuple[jax.Array, ...]:
    result: tuple[jax.Array, ...] = partitioned(*operands)
    return result

  @batchable.def_vmap
  def batched(
      axis_size: int, in_batched: list[bool], *operands: jax.Array
  ) -> tuple[tuple[jax.Array, ...], tuple[bool, ...]]:
    # custom_vmap puts the batch axis first; the handler takes the batch as
    # leading rows with one set of scalars each. Sharding rules do not apply
    # to a vmapped call: XLA places it like any opaque call.
    operands = tuple(
        x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
        for x, is_batched in zip(operands, in_batched, strict=True)
    )
    out = _call_kernel(call, *operands)
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
        functools.partial(_xla_call, call), primals, tangents
    )
    return result

  return differentiable


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
  """The handler as a custom partitioning: each device updates its shard of
  the state where it lives, like the elementwise XLA path."""
  partitioned = custom_partitioning(  # type: ignore[no-untyped-call]
      functools.partial(_call_kernel, call)
  )
  num_arrays = 5 if call.apply else 4
  num_results = num_arrays - 1

  def shardings(mesh: Any, arg_shapes: Any) -> tuple[Any, Any]:
    # The state's sharding (of m) decides: g (and p) follow it, so the state
    # never moves. Shardings without a mesh (rare) are replicated.
    m_shape, _, _ = _state_arrays(call, arg_shapes[_NUM_SCALARS:])
    state_sharding = m_shape.sharding
    if not isinstance(state_sharding, NamedSharding):
      state_sharding = NamedSharding(mesh, PartitionSpec())  # type: ignore[no-untyped-call]
    return state_sharding, NamedSharding(mesh, PartitionSpec())  # type: ignore[no-untyped-call]

  def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    state_sharding, _ = shardings(mesh, arg_shapes)
    return (state_sharding,) * num_results

  def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    state_sharding, scalar = shardings(mesh, arg_shapes)
    arrays = arg_shapes[_NUM_SCALARS:]
    spec = state_sharding.spec
    sharded = any(entry is not None for entry in spec)
    m_shape, v_shape, _ = _state_arrays(call, arrays)
    keys_needed = _needs_keys(call.stochastic, arrays[0], m_shape, v_shape)

    def lower(*operands: jax.Array) -> tuple[jax.Array, ...]:
      if sharded and keys_needed:
        # The random bits depend on each element's position in the whole
        # leaf; the handler knows only the shard, so XLA rounds here, with
        # the shard's global positions.
        index = _global_index(arrays[0].shape, spec, mesh)
        return _xla_call(call, *operands, index=index)
      return _call_kernel(call, *operands)

    arg_shardings = (scalar,) * _NUM_SCALARS + (state_sharding,) * num_arrays
    return mesh, lower, (state_sharding,) * num_results, arg_shardings

  def rule(mesh: Any, value_types: Any, result_types: Any) -> str:
    rank = len(value_types[_NUM_SCALARS].shape)
    factors = " ".join(f"d{i}" for i in range(rank))
    operands = ", ".join([""] * _NUM_SCALARS + [factors] * num_arrays)
    return f"{operands} -> " + ", ".join([factors] * num_results)

  partitioned.def_partition(  # type: ignore[no-untyped-call]
      partition=partition,
      infer_sharding_from_operands=infer,
      sharding_rule=rule,
  )
  return partitioned
