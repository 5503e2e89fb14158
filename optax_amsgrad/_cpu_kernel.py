"""The compiled one-pass AMSGrad handlers for XLA:CPU (``csrc/amsgrad_cpu.cc``).

XLA:CPU compiles the moment update into one kernel per output array, three
full passes over memory. The handlers update ``m``, ``v`` and ``v_max`` in one
pass, in place (``moments``), or also apply the step to the params in the
same pass (``step``), with the arithmetic of the XLA path. ``_moments`` decides
where each leaf runs; this module only registers and calls the handlers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_TARGETS = {"moments": "optax_amsgrad_moments", "step": "optax_amsgrad_step"}

# The coefficient vector, in the handlers' order (enum Coefficient).
COEFFICIENTS = (
    "b1",
    "b2",
    "one_minus_b1",
    "one_minus_b2",
    "nu_max_scale",
    "eps",
    "eps_root",
    "numerator",
    "denominator",
    "step_size",
    "weight_decay",
)

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


@functools.cache
def available() -> bool:
  """Whether the compiled handlers are present and registered with XLA:CPU.

  They are absent when the package was installed without a C++ compiler;
  the XLA path then does all the work.
  """
  try:
    from optax_amsgrad import _amsgrad_cpu  # type: ignore[attr-defined]
  except ImportError:
    return False
  handlers = _amsgrad_cpu.handlers()
  for name, target in _TARGETS.items():
    jax.ffi.register_ffi_target(target, handlers[name], platform="cpu")
  return True


def supports(compute: jnp.dtype, g: jnp.dtype, m: jnp.dtype, v: jnp.dtype) -> bool:
  """Whether the handlers cover these dtypes (real float32/bfloat16 storage
  with float32 arithmetic, or float64 throughout) and are available."""
  key = tuple(jnp.dtype(d) for d in (compute, g, m, v))
  return key in _SUPPORTED and available()


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


def moments(
    coefficients: jax.Array,
    keys: jax.Array,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    stochastic: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored ``m``, ``v`` and ``v_max`` after one step, in one pass.

  Args:
    coefficients: from :func:`pack`, in the compute dtype.
    keys: the uint32 stochastic-rounding stream keys of ``m`` and ``v``.
    g, m, v, v_max: one leaf, all of one shape.
    stochastic: the ``state_rounding="stochastic"`` mode.

  Returns:
    The new ``m``, ``v`` and ``v_max`` in their dtypes, written over the old
    ones when those are donated.
  """
  call = jax.ffi.ffi_call(
      _TARGETS["moments"],
      _like(m, v, v_max),
      input_output_aliases={3: 0, 4: 1, 5: 2},
      # The handler takes leading batch dimensions: one row of coefficients
      # and keys per batch element.
      vmap_method="broadcast_all",
  )
  m, v, v_max = call(coefficients, keys, g, m, v, v_max, stochastic=np.bool_(stochastic))
  return m, v, v_max


def step(
    coefficients: jax.Array,
    keys: jax.Array,
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array,
    *,
    stochastic: bool,
    decay: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """:func:`moments`, and the params after the step, in one pass.

  The params move by ``step_size * (u + weight_decay * p)`` (the decay only
  with ``decay``), where ``u`` is the AMSGrad direction from the stored
  moments; ``p`` and ``g`` are in the compute dtype.
  """
  call = jax.ffi.ffi_call(
      _TARGETS["step"],
      _like(p, m, v, v_max),
      input_output_aliases={3: 0, 4: 1, 5: 2, 6: 3},
      vmap_method="broadcast_all",
  )
  p, m, v, v_max = call(coefficients, keys, g, p, m, v, v_max,
                        stochastic=np.bool_(stochastic), decay=np.bool_(decay))
  return p, m, v, v_max
