"""The optional CPU kernel: AMSGrad's step in one pass over memory on XLA:CPU.

``scale_by_amsgrad`` reaches it through :func:`step_leaves` (and
:func:`step_flat` for a ``flatten_by_dtype`` state), and only when it was
built with ``implementation="cpu"``, which :func:`choose` picks for ``None``
where the kernel was built, ``OPTAX_AMSGRAD_CPU_KERNEL`` is not ``0`` and the
default backend is the CPU. Everywhere else, GPUs and TPUs included, the core
runs ``_math`` leaf by leaf and touches nothing here.

- ``csrc/amsgrad_cpu.cc``: the handlers, C++ called through the XLA FFI.
- ``_ffi``: registering and calling them.
- ``_rules``: which leaves they cover, their vmap, JVP and partitioning
  rules, and the choice between them and XLA when lowering (other platforms
  an exported step may target).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast, get_args

import jax
import jax.numpy as jnp
import numpy as np

from optax_amsgrad import _blockwise, _math
from optax_amsgrad.cpu import _rules
from optax_amsgrad.cpu._ffi import SWITCH, available

__all__ = ["IMPLEMENTATIONS", "Implementation", "Leaf", "available", "choose", "covers",
           "step_flat", "step_leaves"]

# Leaves per handler call: XLA's compile time grows faster than linearly in
# the operands of one call, and beyond a few dozen leaves one call per leaf
# group saves nothing at run time (benchmarks/README.md).
_LEAVES_PER_CALL = 32

KERNEL_UPDATE_SIZE = 1 << 16
"""With ``update``, 8-bit leaves of at most this many elements get their
update from the handler, written over their gradient, and larger ones from
XLA, which decodes the stored moments inside the consumer of the update
(``optax.apply_updates``) and so keeps no float32 copy of it. A model of
many small leaves then compiles no decoding per leaf: XLA's passes take
time in the number of operations."""

# The step's scalars by the params' dtype: (moment coefficients, direction).
Scalars = Callable[[jnp.dtype], tuple[_math.MomentCoefficients, _math.Direction]]


# Which code runs a step: XLA's compilation of ``_math`` (every platform) or
# the compiled handlers (XLA:CPU).
Implementation = Literal["xla", "cpu"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)


def choose(implementation: object) -> Implementation:
  """The implementation a transformation built now with ``implementation``
  takes: ``"cpu"`` and ``"xla"`` as given, ``None`` the kernel where it was
  built, ``OPTAX_AMSGRAD_CPU_KERNEL`` is not ``0`` and the default backend is
  the CPU, XLA elsewhere. Read once, when the transformation is built: what
  is traced later does not depend on the environment."""
  if implementation is None:
    switched_off = os.environ.get(SWITCH, "1").strip() == "0"
    kernel = not switched_off and available() and jax.default_backend() == "cpu"
    return "cpu" if kernel else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))} or None; "
        f"got {implementation!r}."
    )
  if implementation == "cpu" and not available():
    raise ValueError(
        "implementation='cpu': the CPU kernel of optax_amsgrad was not built (the "
        "package was installed without a C++17 compiler). Reinstall it with one, or "
        "use implementation='xla' or None."
    )
  return cast(Implementation, implementation)


class Leaf(NamedTuple):
  """One leaf of a step: the gradient, the params (None for ``update``), the
  stored moments, and whether the weight decay applies to it."""

  g: jax.Array
  p: jax.Array | None
  # Arrays, or 8-bit blocks (``_blockwise.Quantized``).
  m: Any
  v: Any
  v_max: Any
  decay: bool


def covers(leaf: Leaf) -> bool:
  """Whether the handlers step this leaf (with ``implementation="cpu"``)."""
  return _rules.kernel_signature(leaf.g, leaf.m, leaf.v, leaf.v_max, leaf.p) is not None


def step_leaves(
    leaves: Sequence[Leaf],
    scalars: Scalars,
    step: tuple[jax.Array, jax.Array] | None,
    *,
    stochastic: bool,
    seed: jax.Array,
    count: jax.Array,
    xla_leaf: Callable[[int], tuple[jax.Array, ...]],
) -> list[tuple[jax.Array, ...]]:
  """``(updates or params after the step, m, v, v_max)`` of every leaf.

  Leaves the handlers cover go through them, up to 32 of one set of dtypes
  per call; ``xla_leaf(i)`` gives the others. ``step`` is ``(step_size,
  weight_decay)`` when the params move in the same pass (``apply_step``),
  None for ``update``, which returns the updates.
  """
  results: list[tuple[jax.Array, ...] | None] = [None] * len(leaves)
  together: dict[tuple[Any, ...], list[list[int]]] = {}
  for i, leaf in enumerate(leaves):
    signature = _rules.kernel_signature(leaf.g, leaf.m, leaf.v, leaf.v_max, leaf.p)
    if signature is None:
      results[i] = xla_leaf(i)
      continue
    # Whether the handler writes this leaf's update (8-bit, small, no params).
    writes_update = (step is None and _blockwise.is_quantized(leaf.m)
                     and leaf.g.size <= KERNEL_UPDATE_SIZE)
    chunks = together.setdefault((signature, writes_update), [[]])
    if len(chunks[-1]) == _LEAVES_PER_CALL:
      chunks.append([])
    chunks[-1].append(i)
  for (_, writes_update), indices in (
      (key, chunk) for key, chunks in together.items() for chunk in chunks):
    coefficients, direction = scalars(leaves[indices[0]].g.dtype)
    rounding: dict[str, Any] = {"stochastic": stochastic, "seed": seed, "step_count": count,
                                "leaf_indices": indices}
    moments = [(leaves[i].g, leaves[i].m, leaves[i].v, leaves[i].v_max) for i in indices]
    if step is not None:
      group = _rules.stepped_together(
          coefficients, direction, *step,
          # With a step every leaf has its params.
          [(leaves[i].g, cast(jax.Array, leaves[i].p), leaves[i].m, leaves[i].v,
            leaves[i].v_max) for i in indices],
          decay=[leaves[i].decay for i in indices], **rounding,
      )
    elif writes_update:
      group = _rules.updated_together(coefficients, direction, moments, **rounding)
    else:
      stored = _rules.stored_together(coefficients, moments, **rounding)
      # The update reads the stored moments, cast back up: with narrow
      # storage, each buffer's new value then has a single producer that XLA
      # writes in place.
      group = [(_math.leaf_update(m, v_max, direction, leaves[i].g.dtype, split_complex=False),
                m, v, v_max) for i, (m, v, v_max) in zip(indices, stored, strict=True)]
    for i, stepped in zip(indices, group, strict=True):
      results[i] = stepped
  return results  # type: ignore[return-value]


def step_flat(
    g_leaves: Sequence[jax.Array],
    p_leaves: Sequence[jax.Array],
    state: tuple[Mapping[str, jax.Array], Mapping[str, jax.Array], Mapping[str, jax.Array]],
    scalars: Scalars,
    step: tuple[jax.Array, jax.Array],
    *,
    decay: bool,
    stochastic: bool,
    seed: jax.Array,
    count: jax.Array,
) -> tuple[list[jax.Array], tuple[dict[str, jax.Array], ...]] | None:
  """The params after the step and the new flat ``(mu, nu, nu_max)`` of a
  ``flatten_by_dtype`` state (one buffer per dtype name, holding that dtype's
  leaves raveled in order): one pass over each dtype's leaves and buffers.
  None where the handlers do not cover the step (the caller then takes
  ``update`` and ``apply_updates``)."""
  mu, nu, nu_max = state
  if not all(_on_one_device(p) for p in p_leaves):
    # The one-pass handler would return the params whole, on every device.
    return None
  groups: dict[str, list[int]] = {}
  for i, g in enumerate(g_leaves):
    groups.setdefault(jnp.result_type(g).name, []).append(i)
  names = sorted(mu)
  if sorted(groups) != names:
    return None
  for name, indices in groups.items():
    size = sum(int(np.prod(jnp.shape(g_leaves[i]), dtype=np.int64)) for i in indices)
    first = indices[0]
    if (mu[name].size != size
        or _rules.kernel_signature(g_leaves[first], mu[name], nu[name], nu_max[name],
                                   p_leaves[first]) is None
        or any(jnp.result_type(p_leaves[i]) != jnp.result_type(g_leaves[i])
               for i in indices)):
      return None
  new_p: list[jax.Array] = list(p_leaves)
  new_state: tuple[dict[str, jax.Array], ...] = ({}, {}, {})
  for position, name in enumerate(names):
    indices = groups[name]
    ps, buffers = _rules.stepped_flat(
        *scalars(jnp.result_type(g_leaves[indices[0]])), *step,
        [(g_leaves[i], p_leaves[i]) for i in indices],
        (mu[name], nu[name], nu_max[name]),
        decay=decay, stochastic=stochastic, seed=seed, step_count=count,
        leaf_index=position,
    )
    for i, p in zip(indices, ps, strict=True):
      new_p[i] = p
    for tree, buffer in zip(new_state, buffers, strict=True):
      tree[name] = buffer
  return new_p, new_state


def _on_one_device(x: Any) -> bool:
  """Whether ``x`` (an array or a tracer) lives on a single device: its type
  names no mesh of several devices."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return mesh is None or mesh.size <= 1
