"""AMSGrad as an Optax gradient transformation: the state and the update."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_amsgrad import _blockwise, _dtypes, _math, _placement, _rounding, _validation, cpu

Convention = _math.Convention
Implementation = cpu.Implementation
StateRounding = _rounding.StateRounding
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.typing.ArrayLike]


class ScaleByAmsgradState(NamedTuple):
  """State of :func:`scale_by_amsgrad`.

  Attributes:
    count: number of steps taken, int32, saturating at ``2**31 - 1``.
    mu: first moment ``m``, a tree shaped like the params.
    nu: second moment ``v`` (raw exponential average of ``|g|**2``).
    nu_max: running elementwise maximum ``v_max``. It holds raw ``v`` for the
      ``"pytorch"``, ``"keras"`` and ``"paper"`` conventions and the
      bias-corrected ``v / (1 - b2**t)`` for ``"optax"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> solver = optax_amsgrad.amsgrad(1e-2)
    >>> state = solver.init({"w": jnp.zeros(2)})
    >>> _, state = solver.update({"w": jnp.array([2.0, -1.0])}, state)
    >>> optax.tree.get(state, "nu_max")["w"]  # (1 - b2) * g**2
    Array([0.004, 0.001], dtype=float32)
  """

  count: jax.Array  # type: ignore[assignment]
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


class Applying(NamedTuple):
  """How a step moves the params: ``p + step_size * (u + weight_decay * p)``,
  the decay where ``decay`` (a tree of bools shaped like the params)."""

  step_size: jax.typing.ArrayLike
  weight_decay: jax.typing.ArrayLike
  decay: Any

  def scalars(self) -> tuple[jax.Array, jax.Array]:
    """``(step_size, weight_decay)`` as arrays."""
    return jnp.asarray(self.step_size), jnp.asarray(self.weight_decay)


class Options(NamedTuple):
  """A :func:`scale_by_amsgrad`'s hyperparameters and state storage,
  validated."""

  b1: ScalarOrSchedule
  b2: jax.typing.ArrayLike
  eps: jax.typing.ArrayLike
  eps_root: jax.typing.ArrayLike
  convention: Convention
  mu_dtype: jnp.dtype | None
  nu_dtype: jnp.dtype | None
  stochastic: bool
  seed: int
  implementation: cpu.Implementation

  @property
  def split_complex(self) -> bool:
    """Complex params under ``"pytorch"`` keep one second moment per real
    coordinate, stored as the real and imaginary parts of a complex ``nu``,
    as PyTorch does."""
    return self.convention == "pytorch"


class AmsgradUpdate:
  """The update function of a :func:`scale_by_amsgrad`, called as Optax calls
  any update. It carries the transformation's :class:`Options`, and
  ``apply_step`` finds by this type the two ways it also steps the params:
  :meth:`apply` and :meth:`apply_flat`."""

  def __init__(self, options: Options) -> None:
    self.options = options

  def __call__(
      self,
      updates: optax.Updates,
      state: ScaleByAmsgradState,
      params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleByAmsgradState]:
    del params
    return _step(self.options, updates, state, None, None)

  def apply(
      self,
      grads: optax.Updates,
      state: ScaleByAmsgradState,
      params: optax.Params,
      applying: Applying,
  ) -> tuple[optax.Params, ScaleByAmsgradState]:
    """The params after the update and ``applying``, and the new state, in
    one pass per leaf group where the CPU kernel covers it."""
    return _step(self.options, grads, state, params, applying)

  def apply_flat(
      self,
      grads: optax.Updates,
      state: ScaleByAmsgradState,
      params: optax.Params,
      applying: Applying,
  ) -> tuple[optax.Params, ScaleByAmsgradState] | None:
    """:meth:`apply` for a state made on ``ravel_by_dtype(params)`` (by
    ``flatten_by_dtype``): one pass over the leaves of each dtype and their
    flat state with the CPU kernel; None where that path does not apply (the
    caller then takes ``update`` and ``apply_updates``)."""
    return _apply_flat(self.options, grads, state, params, applying)


def scale_by_amsgrad(
    b1: ScalarOrSchedule = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    convention: Convention = "pytorch",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    state_rounding: StateRounding = "stochastic",
    seed: int = 0,
    implementation: cpu.Implementation | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by the AMSGrad rule of Reddi, Kale and Kumar (2018).

  AMSGrad keeps Adam's moments ``m`` and ``v`` and also their running maximum
  ``v_max``, and normalises by that maximum. A rare large gradient therefore
  keeps the step small for good, where Adam's average forgets it and can drift
  to the worst point of a convex problem.

  With ``t`` the step (1 on the first call), ``bc1 = 1 - b1**t`` and
  ``bc2 = 1 - b2**t``, ``m = b1 m + (1 - b1) g`` and
  ``v = b2 v + (1 - b2) |g|^2``, the update ``u`` (apply ``-learning_rate * u``)
  is, by ``convention``:

  =============  ======================  ============================================
  convention     ``nu_max`` holds        update ``u``
  =============  ======================  ============================================
  ``"pytorch"``  ``max(nu_max, v)``      ``(m/bc1) / (sqrt(nu_max/bc2) + eps)``
  ``"keras"``    ``max(nu_max, v)``      ``(m/bc1) sqrt(bc2) / (sqrt(nu_max) + eps)``
  ``"optax"``    ``max(nu_max, v/bc2)``  ``(m/bc1) / (sqrt(nu_max) + eps)``
  ``"paper"``    ``max(nu_max, v)``      ``m / (sqrt(nu_max) + eps)``
  =============  ======================  ============================================

  ``eps_root`` is added under the square root in every convention. The
  ``"pytorch"`` convention treats the real and imaginary parts of complex
  parameters as separate coordinates, as PyTorch does; the others use
  ``|g|^2``, as Optax does.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_amsgrad
    >>> solver = optax.chain(optax_amsgrad.scale_by_amsgrad(), optax.scale(-0.1))
    >>> params = jnp.array([1.0, -2.0, 3.0])
    >>> state = solver.init(params)
    >>> grads = 2 * params
    >>> updates, state = solver.update(grads, state)
    >>> optax.apply_updates(params, updates).round(6)  # first step: -0.1 * sign(g)
    Array([ 0.9, -1.9,  2.9], dtype=float32)

  Args:
    b1: decay of the first moment, in [0, 1). With ``convention="paper"`` it
      may be a schedule ``count -> b1_t`` (the paper's :math:`\beta_{1t}`),
      called with the number of steps already taken.
    b2: decay of the second moment, in [0, 1).
    eps: added to the denominator outside the square root; >= 0.
    eps_root: added inside the square root; make it > 0 to differentiate
      through the update (meta-learning), since ``sqrt`` has an infinite
      derivative at 0.
    convention: whose formula to follow: ``"pytorch"`` (the default),
      ``"keras"``, ``"optax"`` or ``"paper"``; see the table above.
    mu_dtype: storage dtype of ``mu``; defaults to the params' dtype. It sets
      the precision: complex params keep a complex ``mu`` of that precision.
    nu_dtype: storage dtype of ``nu`` and ``nu_max``; defaults to the params'
      real dtype (float32 for float16 params, whose range cannot hold
      ``|g|**2``). Arithmetic is done in at least float32 whatever the storage.
    state_rounding: how moments are stored when the storage dtype has fewer
      mantissa bits than the arithmetic (for example bfloat16):
      ``"stochastic"`` keeps the averages unbiased; ``"nearest"`` is a plain
      cast. ``nu_max`` is always rounded to nearest so that it stays a true,
      non-decreasing maximum.
    seed: seed of the stochastic rounding; the random bits are derived from it
      and the step count, so the state carries no key.
    implementation: which code runs the step, chosen when the transformation
      is built, as ``jax.nn.dot_product_attention`` chooses: ``"xla"``, plain
      JAX that XLA compiles for any platform (what GPUs and TPUs run);
      ``"cpu"``, the compiled one-pass CPU kernel, for the leaves it covers
      (an error where it was not built; lowered for another platform, for
      example by ``jax.export``, the step takes XLA's path there); ``None``,
      the kernel where it was built and the default backend is the CPU, XLA
      elsewhere. ``OPTAX_AMSGRAD_CPU_KERNEL=0`` in the environment makes
      ``None`` mean ``"xla"``; it is read here, not when the step is traced.
      The two agree to a rounding per operation.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAmsgradState`.

  References:
    Reddi, Kale and Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  _validation.check_convention(convention)
  _validation.check_b1(b1, convention)
  _validation.check_unit_interval("b2", b2)
  _validation.check_non_negative("eps", eps)
  _validation.check_non_negative("eps_root", eps_root)
  mu_storage = _validation.resolve_storage_dtype("mu_dtype", mu_dtype)
  nu_storage = _validation.resolve_storage_dtype("nu_dtype", nu_dtype)
  _validation.check_state_rounding(state_rounding)
  _validation.check_seed(seed)
  options = Options(b1, b2, eps, eps_root, convention, mu_storage, nu_storage,
                    stochastic=state_rounding == "stochastic", seed=seed,
                    implementation=cpu.choose(implementation))

  def init_fn(params: optax.Params) -> ScaleByAmsgradState:
    _validation.check_params_dtypes(params, what="params")

    def zeros(buffer: str) -> optax.Updates:
      def leaf(p: Any) -> Any:
        dtype = _storage_dtype(options, buffer, jnp.result_type(p), jnp.shape(p))
        if _blockwise.is_int8(dtype):
          return _blockwise.zeros(_placement.zeros_like(p, jnp.uint8), buffer)
        return _placement.zeros_like(p, dtype)
      return jax.tree.map(leaf, params)

    return ScaleByAmsgradState(
        count=_placement.scalar_zeros(params, jnp.int32),
        mu=zeros("mu"),
        nu=zeros("nu"),
        nu_max=zeros("nu"),
    )

  return optax.GradientTransformation(init_fn, AmsgradUpdate(options))


def _storage_dtype(options: Options, buffer: str, param_dtype: jnp.dtype,
                   shape: tuple[int, ...] = ()) -> jnp.dtype:
  """The dtype of ``buffer`` (``"mu"``, or ``"nu"`` for ``nu`` and
  ``nu_max``) for params of ``param_dtype`` and ``shape``: int8 for the
  blockwise 8-bit storage (``_blockwise``)."""
  complex_params = jnp.issubdtype(param_dtype, jnp.complexfloating)
  if _blockwise.is_int8(options.mu_dtype if buffer == "mu" else options.nu_dtype):
    # Leaves too small (or complex, or float64) for blocks: the compute dtype.
    return (jnp.dtype(jnp.int8) if _blockwise.eligible(shape, param_dtype)
            else _math.compute_dtypes(param_dtype)[0 if buffer == "mu" else 1])
  if buffer == "mu":
    if options.mu_dtype is None:
      return param_dtype
    # The dtype names a precision; the first moment of complex params is
    # complex.
    return (jnp.promote_types(options.mu_dtype, jnp.complex64) if complex_params
            else _dtypes.real_dtype(options.mu_dtype))
  # float16 cannot hold |g|**2 for |g| > 256, so its moments default to
  # float32; bfloat16 has float32's range.
  nu = options.nu_dtype if options.nu_dtype is not None else jnp.dtype(
      jnp.float32 if param_dtype == jnp.float16 else param_dtype)
  if options.split_complex and complex_params:
    return jnp.promote_types(nu, jnp.complex64)
  return _dtypes.real_dtype(nu)


def _step_scalars(
    options: Options, state: ScaleByAmsgradState, grads: optax.Updates
) -> tuple[jax.Array, Callable[[jnp.dtype], tuple[Any, Any]]]:
  """The step count after this step and, by param dtype, the step's scalars
  (computed once per compute dtype)."""
  _validation.check_decays_representable({"b1": options.b1, "b2": options.b2}, grads)
  count = optax.safe_increment(state.count)
  # resolve_b1 passes whatever a schedule returns through jnp.asarray.
  b1: Any = options.b1
  b1_t = _validation.resolve_b1(b1, state.count)
  by_dtype: dict[jnp.dtype, tuple[Any, Any]] = {}

  def scalars(param_dtype: jnp.dtype) -> tuple[Any, Any]:
    dtype = _math.compute_dtypes(param_dtype)[1]
    if dtype not in by_dtype:
      by_dtype[dtype] = _math.coefficients(
          options.convention, dtype, count, b1_t, options.b2, options.eps, options.eps_root)
    return by_dtype[dtype]

  return count, scalars


def _step(
    options: Options,
    updates: optax.Updates,
    state: ScaleByAmsgradState,
    params: optax.Params | None,
    applying: Applying | None,
) -> tuple[optax.Updates, ScaleByAmsgradState]:
  """The updates and new state or, with ``applying``, the params after the
  step and the new state: each leaf by XLA (:func:`_math.leaf_step`), or by the CPU
  kernel where it is in use."""
  _validation.check_state(state, ScaleByAmsgradState, name="scale_by_amsgrad")
  updates = _validation.check_updates_match_state(
      updates, _blockwise.view(state.mu), name="scale_by_amsgrad")
  _check_storage(options, updates, state)
  count, parts = _step_scalars(options, state, updates)
  seed = jnp.uint32(options.seed)
  g_leaves, treedef_ = jax.tree.flatten(updates)
  # PyTreeDef's stubs lack flatten_up_to and unflatten.
  treedef: Any = treedef_
  m_leaves, v_leaves, v_max_leaves = (
      treedef.flatten_up_to(tree) for tree in (state.mu, state.nu, state.nu_max)
  )
  if applying is not None:
    p_leaves = treedef.flatten_up_to(params)
    decays = [bool(x) for x in treedef.flatten_up_to(applying.decay)]
    stepping = applying.scalars()
  else:
    p_leaves = [None] * len(g_leaves)
    decays = [False] * len(g_leaves)
    stepping = None
  leaves = [
      cpu.Leaf(*leaf) for leaf in
      zip(g_leaves, p_leaves, m_leaves, v_leaves, v_max_leaves, decays, strict=True)
  ]
  tree_keys: list[_rounding.StreamKeys] = []

  def stream_keys(i: int) -> _rounding.StreamKeys:
    """Leaf ``i``'s stream keys, those of every leaf made at the first call."""
    if not tree_keys:
      tree_keys.extend(_rounding.tree_stream_keys(
          seed, count, range(len(leaves)),
          complex_parts=any(jnp.iscomplexobj(leaf.g) for leaf in leaves),
      ))
    return tree_keys[i]

  def xla_leaves(indices: list[int]) -> list[tuple[jax.Array, ...]]:
    """(new params or updates, m, v, v_max) of the leaves at ``indices``, by
    XLA: one leaf as it is, several (alike) stacked and stepped as one."""
    first = leaves[indices[0]]
    moment_coefficients, direction = parts(first.g.dtype)
    narrowing = options.stochastic and any(
        _blockwise.is_narrowing(_math.compute_dtypes(first.g.dtype)[1], x)
        for x in (first.m, first.v))

    def step(*operands: Any) -> tuple[jax.Array, ...]:
      stepped: tuple[jax.Array, ...] = _math.leaf_step(
          moment_coefficients, direction, stepping, *operands,
          stochastic=options.stochastic, split_complex=options.split_complex,
          decay=first.decay,
      )
      return stepped

    if len(indices) == 1:
      return [step(*leaves[indices[0]][:5], stream_keys(indices[0]) if narrowing else None)]
    stacked = jax.tree.map(_stack, *(leaves[i][:5] for i in indices))
    # The group's keys as arrays, the same values as each leaf's own.
    keys = (_rounding.stream_keys(seed, count, jnp.asarray(indices, jnp.uint32))
            if narrowing else None)
    together = jax.vmap(step)(*stacked, keys)
    # Each leaf cut out at a position known at run time only (the barrier
    # keeps XLA from folding the positions into constants): the cuts are one
    # compiled kernel, not one per leaf.
    positions = _rounding.run_time_scalars(lax.optimization_barrier(  # type: ignore[no-untyped-call]
        jnp.arange(len(indices), dtype=jnp.uint32)))
    return [jax.tree.map(lambda x, j=j: _cut(x, j), together) for j in positions]

  on_kernel = options.implementation == "cpu"
  grouped = {i: result for indices in _small_8bit_groups(
                 [None if on_kernel and cpu.covers(leaf) else leaf for leaf in leaves])
             for i, result in zip(indices, xla_leaves(indices), strict=True)}

  def xla_leaf(i: int) -> tuple[jax.Array, ...]:
    """(new params or updates, m, v, v_max) of leaf ``i``, by XLA."""
    return grouped[i] if i in grouped else xla_leaves([i])[0]

  if options.implementation == "cpu":
    results = cpu.step_leaves(
        leaves, parts, stepping, stochastic=options.stochastic, seed=seed, count=count,
        xla_leaf=xla_leaf,
    )
  else:
    results = [xla_leaf(i) for i in range(len(leaves))]
  new_updates, new_mu, new_nu, new_nu_max = (
      treedef.unflatten([r[k] for r in results]) for k in range(4)
  )
  return new_updates, ScaleByAmsgradState(count=count, mu=new_mu, nu=new_nu, nu_max=new_nu_max)


def _stack(*arrays: jax.Array) -> jax.Array:
  """``jnp.stack(arrays)`` (of one shape, at least 1-D) in two operations, a
  concatenation and a reshape, rather than a reshape per array: XLA's passes
  take time in the number of operations."""
  return lax.concatenate(arrays, 0).reshape(len(arrays), *arrays[0].shape)


def _cut(x: jax.Array, j: jax.Array) -> jax.Array:
  """``x[j]`` for a position ``j`` (uint32) known at run time only: unsigned,
  so that no wrapping of negative positions is added to each cut."""
  start: tuple[Any, ...] = (j, *[np.uint32(0)] * (x.ndim - 1))
  return lax.squeeze(lax.dynamic_slice(x, start, (1, *x.shape[1:])), (0,))


GROUPED_LEAF_SIZE = 1 << 16
"""8-bit leaves of at most this many elements, alike in shape, dtypes and
options, are stepped as one stack on one device."""
GROUP_ELEMENTS = 1 << 20
"""The most elements in one stack: more alike leaves make several stacks.
The step makes several passes over a stack and its temporaries, which
stay in cache when the stack is small (500 leaves of 8,192 on a 2-core
CPU: 78 ms a step in one stack, 42-47 ms in stacks of at most 128), and
they are smaller (33 MB against 45 MB there)."""


def _small_8bit_groups(leaves: list[cpu.Leaf | None]) -> list[list[int]]:
  """The indices of small 8-bit leaves that can be stepped as one stack
  (None: a leaf stepped elsewhere, by the CPU kernel).

  The 8-bit step is hundreds of operations per leaf, and XLA's passes take
  time in the number of operations: a model with many small 8-bit leaves
  compiles once per group instead of once per leaf. Stacking copies the
  leaves (their size is bounded), and on several devices it could gather
  leaves sharded differently, so it is done on one device only."""
  if jax.device_count() != 1 or jax.sharding.get_abstract_mesh().manual_axes:
    return []
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, leaf in enumerate(leaves):
    if leaf is None:
      continue
    stored = (leaf.m, leaf.v, leaf.v_max)
    if not any(map(_blockwise.is_quantized, stored)) or leaf.g.size > GROUPED_LEAF_SIZE:
      continue
    alike = (leaf.g.shape, leaf.g.dtype, None if leaf.p is None else leaf.p.dtype, leaf.decay,
             *(jax.tree.map(lambda x: (x.shape, x.dtype), x) for x in stored))
    groups.setdefault(alike, []).append(i)
  stacks = []
  for (shape, *_), indices in groups.items():
    per_stack = GROUP_ELEMENTS // math.prod(shape)
    stacks += [indices[k:k + per_stack] for k in range(0, len(indices), per_stack)]
  return [indices for indices in stacks if len(indices) > 1]


def _apply_flat(
    options: Options,
    grads: optax.Updates,
    state: ScaleByAmsgradState,
    params: optax.Params,
    applying: Applying,
) -> tuple[optax.Params, ScaleByAmsgradState] | None:
  """:meth:`AmsgradUpdate.apply_flat`."""
  _validation.check_state(state, ScaleByAmsgradState, name="scale_by_amsgrad")
  # One weight-decay flag for every leaf (a mask goes outside the flat
  # layout).
  decays = {bool(x) for x in jax.tree.leaves(applying.decay)}
  if (options.implementation != "cpu" or len(decays) > 1 or not isinstance(state.mu, dict)
      or any(map(_blockwise.is_quantized, (*state.mu.values(), *state.nu.values())))):
    return None
  g_leaves, treedef = jax.tree.flatten(grads)
  count, parts = _step_scalars(options, state, grads)
  stepped = cpu.step_flat(
      g_leaves, treedef.flatten_up_to(params),  # type: ignore[attr-defined]
      (state.mu, state.nu, state.nu_max), parts,
      applying.scalars(),
      decay=next(iter(decays), False), stochastic=options.stochastic,
      seed=jnp.uint32(options.seed), count=count,
  )
  if stepped is None:
    return None
  new_params, (mu, nu, nu_max) = stepped
  return treedef.unflatten(new_params), ScaleByAmsgradState(  # type: ignore[attr-defined]
      count=count, mu=mu, nu=nu, nu_max=nu_max
  )


def _check_storage(options: Options, updates: optax.Updates, state: ScaleByAmsgradState) -> None:
  """Each state leaf must be stored as ``options`` asks for: 8-bit blocks
  where ``"int8"`` applies, plain arrays elsewhere."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  for buffer, field in (("mu", "mu"), ("nu", "nu"), ("nu", "nu_max")):
    stored = treedef.flatten_up_to(getattr(state, field))  # type: ignore[attr-defined]
    for (path, g), x in zip(flat, stored, strict=True):
      shape = tuple(jnp.shape(g))
      expected = _blockwise.is_int8(
          _storage_dtype(options, buffer, jnp.result_type(g), shape))
      if expected == _blockwise.is_quantized(x) and (
          not expected or tuple(x.exponents.shape) == _blockwise.exponents_shape(shape)):
        continue
      name = "mu_dtype" if buffer == "mu" else "nu_dtype"
      found = ("8-bit blocks (int8 storage)" if _blockwise.is_quantized(x)
               else f"an array of {jnp.result_type(x)}")
      raise TypeError(
          f"scale_by_amsgrad: the state's {field} at {_validation.path_name(path)} is "
          f"{found}, but this optimizer was made with {name}="
          f"{getattr(options, name + '')} and stores "
          + ("that leaf in 8-bit blocks" if expected else "that leaf as an array")
          + (f" with exponents of shape {_blockwise.exponents_shape(shape)}, not "
             f"{tuple(x.exponents.shape)}" if expected and _blockwise.is_quantized(x) else "")
          + ". Make the state with this optimizer's init (or the optimizer with "
          "the options that made the state)."
      )
