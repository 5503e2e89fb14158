"""The compiled one-pass AMSGrad handlers for XLA:CPU (``csrc/amsgrad_cpu.cc``):
their FFI binding.

XLA:CPU compiles the moment update into one kernel per output array, three
full passes over memory. The handlers update ``m``, ``v`` and ``v_max`` in one
pass, in place (``moments``), or also apply the step to the params in the
same pass (``step``), with the arithmetic of the XLA path (``_math``);
``blockwise`` does either for 8-bit blockwise state (``_blockwise``). The
package's ``__init__`` decides where each leaf runs; ``_rules`` gives the calls
their sharding, vmap and JVP rules; this module registers and calls them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_TARGETS = {
    "moments": "optax_amsgrad_moments",
    "step": "optax_amsgrad_step",
    "flat_step": "optax_amsgrad_flat_step",
    "blockwise_moments": "optax_amsgrad_blockwise_moments",
    "blockwise_update": "optax_amsgrad_blockwise_update",
    "blockwise_step": "optax_amsgrad_blockwise_step",
}

# The coefficient vector, in the handlers' order: the names of
# csrc/coefficients.def, the C++ enum's one source.
COEFFICIENTS = tuple(re.findall(
    r"^COEFFICIENT\((\w+),",
    (Path(__file__).parent / "csrc" / "coefficients.def").read_text(), flags=re.MULTILINE,
))

# (compute, g, m, v) dtypes the handlers are compiled for. The step handler
# also needs the params (and g) in the compute dtype.
_SUPPORTED = {
    (jnp.dtype(c), jnp.dtype(g), jnp.dtype(m), jnp.dtype(v))
    for c, g, m, v in [
        (jnp.float64, jnp.float64, jnp.float64, jnp.float64),
        *(
            (jnp.float32, g, m, v)
            for g in (jnp.float32, jnp.bfloat16)
            for m in (jnp.float32, jnp.bfloat16)
            for v in (jnp.float32, jnp.bfloat16)
        ),
    ]
}


# Set to "0" to make the XLA path the default of ``implementation=None``
# (read when a transformation is built, see ``optax_amsgrad.cpu.choose``).
SWITCH = "OPTAX_AMSGRAD_CPU_KERNEL"


def available() -> bool:
  """Whether the compiled CPU handlers are present and registered with XLA.

  They are built when the package is installed with a C++17 compiler at
  hand, and absent otherwise; every step then takes the XLA path, with the
  same results to within a rounding per operation, only slower on CPU. Which
  path a transformation takes is its ``implementation`` option (see
  :func:`optax_amsgrad.scale_by_amsgrad`); this function only says whether
  ``implementation="cpu"`` can be chosen.

  Examples:
    >>> import optax_amsgrad
    >>> optax_amsgrad.cpu_kernel_available()
    True
  """
  return _registered()


@functools.cache
def _registered() -> bool:
  """Registers the handlers with XLA once; False when they were not built."""
  try:
    from optax_amsgrad.cpu import _amsgrad_cpu  # type: ignore[attr-defined]
  except ImportError:
    return False
  handlers = _amsgrad_cpu.handlers()
  for name, target in _TARGETS.items():
    jax.ffi.register_ffi_target(target, handlers[name], platform="cpu")
  return True


def supports(compute: jnp.dtype, g: jnp.dtype, m: jnp.dtype, v: jnp.dtype) -> bool:
  """Whether the handlers cover these dtypes (real float32/bfloat16 storage
  with float32 arithmetic, or float64 throughout) and are built."""
  key = tuple(jnp.dtype(d) for d in (compute, g, m, v))
  return key in _SUPPORTED and available()


def supports_blockwise(g: jnp.dtype, p: jnp.dtype | None) -> bool:
  """Whether the handlers cover a leaf whose three buffers are all 8-bit
  blockwise (float32 gradients and params) and are built."""
  return jnp.dtype(g) == jnp.float32 and p in (None, jnp.float32) and available()


def pack(values: dict[str, jax.Array], dtype: jnp.dtype) -> jax.Array:
  """The coefficient vector (last axis) from named values; unnamed ones are
  zero. Values may carry leading batch dimensions, all the same."""
  unknown = set(values) - set(COEFFICIENTS)
  if unknown:
    raise ValueError(f"unknown coefficients {sorted(unknown)}")
  shape = np.broadcast_shapes(*(jnp.shape(x) for x in values.values()))
  return jnp.stack(
      [jnp.broadcast_to(jnp.asarray(values.get(name, 0), dtype), shape)
       for name in COEFFICIENTS],
      axis=-1,
  )


def _like(*arrays: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
  # The results keep the operands' types, sharding included (with Explicit
  # mesh axes it is part of the type).
  return tuple(
      jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]
          x.shape, x.dtype, sharding=jax.typeof(x).sharding
      )
      for x in arrays
  )


def _call(
    target: str,
    coefficients: jax.Array,
    keys: jax.Array,
    operands: Sequence[jax.Array],
    written: Sequence[int],
    *,
    stochastic: bool,
    decay: Sequence[bool],
) -> tuple[jax.Array, ...]:
  """One handler call; its results are the new values of
  ``operands[i] for i in written``, in that order, written over them."""
  call = jax.ffi.ffi_call(
      target,
      _like(*(operands[i] for i in written)),
      # The coefficients and keys come first.
      input_output_aliases={2 + i: k for k, i in enumerate(written)},
      # The handlers take leading batch dimensions: one row of coefficients
      # and keys per batch element.
      vmap_method="broadcast_all",
  )
  result: tuple[jax.Array, ...] = tuple(call(
      coefficients, keys, *operands, stochastic=np.bool_(stochastic),
      decay=np.asarray(decay, np.int64),
  ))
  return result


def _per_leaf(
    target: str,
    coefficients: jax.Array,
    keys: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    num_results: int,
    *,
    stochastic: bool,
    decay: Sequence[bool],
) -> list[tuple[jax.Array, ...]]:
  """A call over leaves of operands each, the last ``num_results`` of each
  leaf written over by its results."""
  per_leaf = len(leaves[0])
  written = [per_leaf * i + j for i in range(len(leaves))
             for j in range(per_leaf - num_results, per_leaf)]
  flat = _call(target, coefficients, keys, [x for leaf in leaves for x in leaf], written,
               stochastic=stochastic, decay=decay)
  return [flat[num_results * i: num_results * (i + 1)] for i in range(len(leaves))]


def moments(
    coefficients: jax.Array,
    keys: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    stochastic: bool,
) -> list[tuple[jax.Array, ...]]:
  """The stored ``m``, ``v`` and ``v_max`` of each leaf after one step, in one
  pass over all of them.

  Args:
    coefficients: from :func:`pack`, in the compute dtype.
    keys: the uint32 stochastic-rounding stream keys, ``[..., leaf, (m, v)]``.
    leaves: ``(g, m, v, v_max)`` per leaf, all of one shape within a leaf and
      of one set of dtypes across leaves.
    stochastic: the ``state_rounding="stochastic"`` mode.

  Returns:
    ``(m, v, v_max)`` per leaf, written over the old ones when those are
    donated.
  """
  return _per_leaf(_TARGETS["moments"], coefficients, keys, leaves, 3,
                   stochastic=stochastic, decay=[False] * len(leaves))


def step(
    coefficients: jax.Array,
    keys: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]],
    *,
    stochastic: bool,
    decay: Sequence[bool],
) -> list[tuple[jax.Array, ...]]:
  """:func:`moments`, and the params after the step, in one pass.

  ``leaves`` holds ``(g, p, m, v, v_max)``; the params move by
  ``step_size * (u + weight_decay * p)`` (the decay where ``decay`` says so),
  where ``u`` is the AMSGrad direction from the stored moments; ``p`` and
  ``g`` are in the compute dtype. Returns ``(p, m, v, v_max)`` per leaf.
  """
  return _per_leaf(_TARGETS["step"], coefficients, keys, leaves, 4,
                   stochastic=stochastic, decay=decay)


def flat_step(
    coefficients: jax.Array,
    keys: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array]],
    state: tuple[jax.Array, jax.Array, jax.Array],
    *,
    stochastic: bool,
    decay: Sequence[bool],
) -> tuple[list[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """:func:`step` for a state kept as one flat buffer per moment
  (``flatten_by_dtype``): ``leaves`` holds ``(g, p)`` and ``state`` the flat
  ``(m, v, v_max)`` holding every leaf, raveled, in order; ``keys`` the two
  stream keys of that state, ``[..., (m, v)]``. Returns the params after the
  step per leaf and the new flat state."""
  num_leaves = len(leaves)
  written = [2 * i + 1 for i in range(num_leaves)] + [2 * num_leaves + j for j in range(3)]
  flat = _call(_TARGETS["flat_step"], coefficients, keys,
               [*(x for leaf in leaves for x in leaf), *state], written,
               stochastic=stochastic, decay=decay)
  m, v, v_max = flat[num_leaves:]
  return list(flat[:num_leaves]), (m, v, v_max)


def blockwise(
    coefficients: jax.Array,
    keys: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    stochastic: bool,
    decay: Sequence[bool] | None = None,
    update: bool = False,
) -> list[tuple[jax.Array, ...]]:
  """:func:`moments` (``decay`` None), the same with the update (``update``)
  or :func:`step` for leaves whose ``m``, ``v`` and ``v_max`` are all 8-bit
  blockwise (``_blockwise.Quantized``), each given as its codes and
  exponents: ``leaves`` holds ``(g, [p,] m_codes, m_exponents, v_codes,
  v_exponents, v_max_codes, v_max_exponents)``, and the results per leaf are
  the same less ``g`` (with ``update``, the update first, written over
  ``g``). The blocks, their scales and the codes are those of
  ``_blockwise``."""
  if decay is None:
    target, written = ("blockwise_update", 7) if update else ("blockwise_moments", 6)
    return _per_leaf(_TARGETS[target], coefficients, keys, leaves, written,
                     stochastic=stochastic, decay=[False] * len(leaves))
  return _per_leaf(_TARGETS["blockwise_step"], coefficients, keys, leaves, 7,
                   stochastic=stochastic, decay=decay)
