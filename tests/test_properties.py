"""Property-based tests: scale_by_amsgrad against the float64 NumPy reference
over random trees (nesting, None leaves, zero-size and scalar shapes), dtypes,
conventions and hyperparameters.

The number of examples and the seed come from the hypothesis profile loaded
in conftest.py ("ci" by default: fixed seed, a few hundred examples).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st

import optax_amsgrad

from reference import ReferenceAmsgrad

CONVENTIONS = ("pytorch", "keras", "optax", "paper")

# Shapes with dimensions 0..3: zero-size arrays and scalars included.
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
keys = st.sampled_from(["a", "b", "c", "kernel", "bias"])


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
  """Nested dicts, lists and tuples of ``leaves`` (and None), depth <= 3."""
  return st.recursive(
      st.one_of(leaves, st.none()),
      lambda children: st.one_of(
          st.dictionaries(keys, children, max_size=3),
          st.lists(children, max_size=3),
          st.lists(children, max_size=3).map(tuple),
      ),
      max_leaves=6,
  )


hyperparameters = st.fixed_dictionaries({
    "b1": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    "b2": st.sampled_from([0.0, 0.5, 0.9, 0.999, 0.9999]),
    "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
    "eps_root": st.sampled_from([0.0, 1e-10, 1e-4]),
    "convention": st.sampled_from(CONVENTIONS),
})


def _gradient_sequence(rng: np.random.Generator, shape: tuple[int, ...],
                       steps: int, dtype: np.dtype, scale: float) -> list:
  """Gaussian gradients of one leaf with an occasional spike, per step."""
  sequence = []
  for _ in range(steps):
    g = rng.normal(size=shape) * scale
    g = np.where(rng.random(size=shape) < 0.1, 100.0 * g, g)
    if np.issubdtype(dtype, np.complexfloating):
      g = g + 1j * rng.normal(size=shape) * scale
    sequence.append(np.asarray(g, dtype))
  return sequence


def _run_and_compare(tree, dtype, options, steps, seed, scale, rtol) -> None:
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(tree)
  sequences = [_gradient_sequence(rng, s, steps, dtype, scale) for s in leaves]
  references = [
      ReferenceAmsgrad(s, complex_params=np.issubdtype(dtype, np.complexfloating),
                       **options)
      for s in leaves
  ]
  solver = optax_amsgrad.scale_by_amsgrad(**options)
  params = treedef.unflatten([jnp.zeros(s, dtype) for s in leaves])
  state = solver.init(params)
  for k in range(steps):
    grads = treedef.unflatten([jnp.asarray(seq[k]) for seq in sequences])
    updates, state = solver.update(grads, state)
    assert jax.tree.structure(updates) == treedef
    assert int(state.count) == k + 1
    for u, seq, ref in zip(jax.tree.leaves(updates), sequences, references,
                           strict=True):
      assert u.dtype == dtype and u.shape == seq[k].shape
      # The reference steps on the gradient as the optimizer saw it: the
      # float32 cases compare float32 arithmetic with exact arithmetic.
      expected = ref.step(seq[k])
      scale_of_leaf = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
      error = float(np.max(np.abs(np.asarray(u) - expected), initial=0.0))
      assert error <= rtol * scale_of_leaf, (k, error, scale_of_leaf)


@given(
    tree=trees(shapes),
    dtype=st.sampled_from([np.float64, np.complex128]),
    options=hyperparameters,
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_float64_matches_reference(tree, dtype, options, steps, seed, scale):
  # float64 arithmetic against float64 arithmetic: round-off only.
  _run_and_compare(tree, dtype, options, steps, seed, scale, rtol=1e-11)


@given(
    tree=trees(shapes),
    dtype=st.sampled_from([np.float32, np.complex64]),
    options=hyperparameters,
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_float32_matches_reference(tree, dtype, options, steps, seed, scale):
  # float32 against exact arithmetic: a few dozen float32 ulps (6e-8 each)
  # relative to the largest update of the leaf, over a handful of steps.
  _run_and_compare(tree, dtype, options, steps, seed, scale, rtol=1e-5)


@given(
    tree=trees(shapes),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
    state_dtype=st.sampled_from([None, jnp.bfloat16, jnp.float32]),
    state_rounding=st.sampled_from(["stochastic", "nearest"]),
    convention=st.sampled_from(CONVENTIONS),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    log_scale=st.sampled_from([-30.0, -4.0, 0.0, 2.5, 4.0, 30.0]),
)
def test_invariants_in_narrow_dtypes(
    tree, dtype, state_dtype, state_rounding, convention, steps, seed, log_scale
):
  # Whatever the storage, the tree and dtypes are kept, nothing overflows for
  # gradients the parameter dtype can hold, and nu_max never decreases.
  if dtype == jnp.float16 and state_dtype is None:
    state_dtype = jnp.float32  # float16 cannot hold |g|**2 (test_validation)
  rng = np.random.default_rng(seed)
  solver = optax_amsgrad.scale_by_amsgrad(
      convention=convention, mu_dtype=state_dtype, nu_dtype=state_dtype,
      state_rounding=state_rounding, seed=seed,
  )
  leaves, treedef = jax.tree.flatten(tree)
  params = treedef.unflatten([jnp.zeros(s, dtype) for s in leaves])
  state = solver.init(params)
  largest = float(jnp.finfo(dtype).max)
  for k in range(steps):
    grads = treedef.unflatten([
        jnp.asarray(np.clip(rng.normal(size=s) * 10.0**log_scale, -largest,
                            largest), dtype)
        for s in leaves
    ])
    updates, new_state = solver.update(grads, state)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert u.dtype == g.dtype and u.shape == g.shape
      assert bool(jnp.all(jnp.isfinite(u)))
      if k == 0:
        # The first step moves every coordinate against its gradient (|u| may
        # round to 0 where eps dominates a tiny gradient, never the sign).
        nonzero = (g != 0) & (u != 0)
        assert bool(jnp.all(jnp.sign(u)[nonzero] == jnp.sign(g)[nonzero]))
    for old, new in zip(jax.tree.leaves(state.nu_max),
                        jax.tree.leaves(new_state.nu_max), strict=True):
      assert new.dtype == old.dtype
      assert bool(jnp.all(new >= old)) and bool(jnp.all(jnp.isfinite(new)))
    for field in ("mu", "nu"):
      for old, new in zip(jax.tree.leaves(getattr(state, field)),
                          jax.tree.leaves(getattr(new_state, field)), strict=True):
        assert new.dtype == old.dtype and bool(jnp.all(jnp.isfinite(new)))
    state = new_state


@given(
    options=hyperparameters,
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_optax_convention_equals_optax_amsgrad(options, steps, seed):
  # The "optax" convention against optax.amsgrad itself, which is a second,
  # independent implementation of that formula.
  options = {**options, "convention": "optax"}
  rng = np.random.default_rng(seed)
  ours = optax_amsgrad.scale_by_amsgrad(**options)
  theirs = optax.scale_by_amsgrad(
      b1=options["b1"], b2=options["b2"], eps=options["eps"],
      eps_root=options["eps_root"],
  )
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for _ in range(steps):
    grads = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params.items()}
    u_ours, s_ours = ours.update(grads, s_ours)
    u_theirs, s_theirs = theirs.update(grads, s_theirs)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-12, atol=0)
