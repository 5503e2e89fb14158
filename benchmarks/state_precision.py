"""Quality, memory and step time of AMSGrad with bfloat16 optimizer state.

Compares, on several problems and seeds, the final loss reached at a fixed
step budget with

* ``float32``: float32 state (the reference),
* ``bf16_cast``: bfloat16 state stored with a plain cast
  (``state_rounding="nearest"``),
* ``bf16_stochastic``: bfloat16 state with stochastic rounding of ``mu`` and
  ``nu`` and ``nu_max`` rounded up (``state_rounding="stochastic"``, the
  default for narrow state dtypes),
* ``bf16_kahan``: a prototype kept in this script for comparison only:
  ``mu`` and ``nu`` stored as a bfloat16 pair (value and rounding residual,
  compensated summation), ``nu_max`` rounded up: 10 bytes per parameter,

and, as a yardstick of how much the final loss moves under any tiny change of
the trajectory, ``float32_jitter``: float32 state started from the initial
params perturbed by a relative ``JITTER`` (zeros by ``JITTER`` itself), up or
down at random. The run records how far that moved the final params
(``control_moved``: the largest change relative to the largest final param),
so the control is seen to move the trajectory.

Then it times one jitted, donated step of a single 1e7-parameter float32 leaf
with float32 and bfloat16 state on the default device (CPU), taken by
``update`` and ``optax.apply_updates`` and by ``optax_amsgrad.apply_step``,
interleaving the variants and taking medians, next to a streaming
``a + s * b`` of the same size for the machine's bandwidth.

Run (about 3 minutes on 2 CPU cores)::

  python benchmarks/state_precision.py

It writes ``benchmarks/results/state_precision.json`` (or ``--out``), with
the commit, machine and versions of the run, and prints a summary.
``--quick`` runs fewer seeds and steps (a smoke test, not the figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from machine import CORE_PACKAGES, command_line, load_average, provenance

import optax_amsgrad
from optax_amsgrad import _blockwise, _math, _rounding

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Problem(NamedTuple):
  """A training problem: ``loss(params, step)`` is the minibatch loss of
  step ``step``; ``final_loss(params)`` the loss reported at the end."""

  loss: Callable[[Any, jax.Array], jax.Array]
  final_loss: Callable[[Any], jax.Array]
  params: Any
  learning_rate: float
  steps: int


def _least_squares(seed: int, batch: int | None) -> Problem:
  rng = np.random.default_rng(seed)
  n, d = 1024, 64
  u, _ = np.linalg.qr(rng.normal(size=(n, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a = (u * np.logspace(0, -2, d)) @ v.T * np.sqrt(n)
  x_true = rng.normal(size=d)
  b = a @ x_true + 0.01 * rng.normal(size=n)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  key = jax.random.PRNGKey(seed)

  def final_loss(params):
    return jnp.mean((a @ params["x"] - b) ** 2)

  def loss(params, step):
    if batch is None:
      return final_loss(params)
    index = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, n)
    return jnp.mean((a[index] @ params["x"] - b[index]) ** 2)

  return Problem(loss, final_loss, {"x": jnp.zeros(d, jnp.float32)}, 3e-3, 3000)


def least_squares(seed: int) -> Problem:
  """Full-batch least squares, 1024 x 64, condition number 100, still
  converging at the budget (the loss is still falling at the last step)."""
  return _least_squares(seed, None)


def least_squares_minibatch(seed: int) -> Problem:
  """The same least squares with minibatches of 32: noisy |g|**2, the regime
  where the rounding noise of a 2-byte nu is largest relative to its drift."""
  return _least_squares(seed, 32)


def _mlp_params(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
  layers = []
  for fan_in, fan_out in itertools.pairwise(sizes):
    key, sub = jax.random.split(key)
    layers.append({
        "w": jax.random.normal(sub, (fan_in, fan_out), jnp.float32)
        / np.sqrt(fan_in),
        "b": jnp.zeros(fan_out, jnp.float32),
    })
  return layers


def _mlp(layers, x, activation=jnp.tanh):
  for layer in layers[:-1]:
    x = activation(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


def noisy_mlp(seed: int) -> Problem:
  """Regression of a smooth 2-d function with label noise (std 0.1) by a
  2-32-32-1 tanh MLP, minibatches of 32."""
  rng = np.random.default_rng(seed)
  n, batch = 1024, 32
  x = rng.uniform(-2, 2, size=(n, 2))
  y = np.sin(2 * x[:, :1]) * np.cos(x[:, 1:]) + 0.1 * rng.normal(size=(n, 1))
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  key = jax.random.PRNGKey(seed)
  params = _mlp_params(jax.random.fold_in(key, 1), [2, 32, 32, 1])

  def loss(params, step):
    index = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, n)
    return jnp.mean((_mlp(params, x[index]) - y[index]) ** 2)

  def final_loss(params):
    return jnp.mean((_mlp(params, x) - y) ** 2)

  return Problem(loss, final_loss, params, 3e-3, 2000)


def two_layer(seed: int) -> Problem:
  """The two-layer ReLU network of the PyTorch examples: N=64, D_in=1000,
  H=100, D_out=10, random data, summed squared error, lr 1e-4, 500 steps."""
  rng = np.random.default_rng(seed)
  n, d_in, hidden, d_out = 64, 1000, 100, 10
  x = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, d_out)), jnp.float32)
  params = {
      "w1": jnp.asarray(rng.normal(size=(d_in, hidden)), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(hidden, d_out)), jnp.float32),
  }

  def final_loss(params):
    return jnp.sum((jnp.maximum(x @ params["w1"], 0) @ params["w2"] - y) ** 2)

  return Problem(lambda p, step: final_loss(p), final_loss, params, 1e-4, 500)


def digits(seed: int) -> Problem:
  """scikit-learn's 8x8 digits (1797 images), a 64-64-10 ReLU MLP with
  softmax cross-entropy, minibatches of 64; the final loss is the training
  cross-entropy on all images."""
  from sklearn.datasets import load_digits

  data = load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float32)
  labels = jnp.asarray(data.target, jnp.int32)
  n, batch = x.shape[0], 64
  key = jax.random.PRNGKey(seed)
  params = _mlp_params(jax.random.fold_in(key, 1), [64, 64, 10])

  def cross_entropy(params, x, labels):
    logits = _mlp(params, x, activation=jax.nn.relu)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def loss(params, step):
    index = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, n)
    return cross_entropy(params, x[index], labels[index])

  return Problem(
      loss, lambda p: cross_entropy(p, x, labels), params, 1e-3, 1500
  )


def digits_cnn(seed: int) -> Problem:
  """scikit-learn's 8x8 digits split into 1397 training and 400 held-out
  images (by the seed), a CNN (two 3x3 ReLU convolutions of 16 and 32
  channels, a dense layer of 64, softmax over 10), minibatches of 64 in the
  seed's order; the final loss is the cross-entropy on the held-out images."""
  from sklearn.datasets import load_digits

  data = load_digits()
  order = np.random.default_rng(seed).permutation(len(data.target))
  images = jnp.asarray(data.images[order, :, :, None] / 16.0, jnp.float32)
  labels = jnp.asarray(data.target[order], jnp.int32)
  x, y, x_test, y_test = images[400:], labels[400:], images[:400], labels[:400]
  n, batch = x.shape[0], 64
  key = jax.random.PRNGKey(seed)
  keys = jax.random.split(jax.random.fold_in(key, 1), 4)

  def init(k, shape, fan_in):
    return jax.random.normal(k, shape, jnp.float32) * np.sqrt(2 / fan_in)

  params = {
      "conv1": init(keys[0], (3, 3, 1, 16), 9), "b1": jnp.zeros(16, jnp.float32),
      "conv2": init(keys[1], (3, 3, 16, 32), 144), "b2": jnp.zeros(32, jnp.float32),
      "dense": init(keys[2], (8 * 8 * 32, 64), 2048), "b3": jnp.zeros(64, jnp.float32),
      "out": init(keys[3], (64, 10), 64), "b4": jnp.zeros(10, jnp.float32),
  }

  def cross_entropy(params, x, labels):
    conv = lambda h, w: jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(conv(x, params["conv1"]) + params["b1"])
    h = jax.nn.relu(conv(h, params["conv2"]) + params["b2"])
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["dense"] + params["b3"])
    logits = h @ params["out"] + params["b4"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def loss(params, step):
    index = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, n)
    return cross_entropy(params, x[index], y[index])

  return Problem(loss, lambda p: cross_entropy(p, x_test, y_test), params, 1e-3, 1000)


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "least_squares": least_squares,
    "least_squares_minibatch": least_squares_minibatch,
    "noisy_mlp": noisy_mlp,
    "two_layer": two_layer,
    "digits": digits,
}
# The 8-bit rows (--int8) also train a CNN and report a held-out loss.
INT8_PROBLEMS: dict[str, Callable[[int], Problem]] = {**PROBLEMS, "digits_cnn": digits_cnn}


# Prototypes of alternative storage schemes, for comparison only. Both follow
# the "pytorch" convention and store nu_max as the library does (rounded to
# nearest, never to zero); only the storage of mu and nu differs.
class PrototypeState(NamedTuple):
  count: jax.Array
  mu: Any  # a tuple of arrays per leaf: the stored representation
  nu: Any
  nu_max: Any


class Codec(NamedTuple):
  """How a float32 moment is kept: ``encode(x, count, buffer, leaf_index)``
  returns a tuple of arrays, ``decode`` the float32 value back."""

  init: Callable[[jax.Array], tuple[jax.Array, ...]]
  encode: Callable[[jax.Array, jax.Array, str, int], tuple[jax.Array, ...]]
  decode: Callable[[tuple[jax.Array, ...]], jax.Array]


def _bf16_zeros(p):
  return jnp.zeros_like(p, jnp.bfloat16)


def _kahan_encode(x, count, buffer, leaf_index):
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


# Compensated storage: a bfloat16 pair (value, rounding residual) holds about
# 16 significant bits, 4 bytes per moment.
KAHAN = Codec(
    init=lambda p: (_bf16_zeros(p), _bf16_zeros(p)),
    encode=_kahan_encode,
    decode=lambda parts: parts[0].astype(jnp.float32) + parts[1].astype(jnp.float32),
)


def _weyl_encode(x, count, buffer, leaf_index):
  # Per-element random phase (the library's hash with the step left out),
  # advanced by 2**32 / golden ratio each step: a randomly shifted Weyl
  # sequence of thresholds instead of independent ones.
  key = _rounding.stream_key(0, 0, buffer, leaf_index)
  phase = _rounding.random_bits(x.shape, key=key, buffer=buffer)
  bits = phase + count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
  return (_rounding._stochastic_bfloat16(x, bits >> 16),)


WEYL = Codec(
    init=lambda p: (_bf16_zeros(p),),
    encode=_weyl_encode,
    decode=lambda parts: parts[0].astype(jnp.float32),
)


def prototype_amsgrad(codec: Codec, b1=0.9, b2=0.999, eps=1e-8
                      ) -> optax.GradientTransformation:
  """``scale_by_amsgrad`` ("pytorch" convention) with mu and nu kept by
  ``codec``."""

  def init(params):
    return PrototypeState(
        jnp.zeros([], jnp.int32),
        jax.tree.map(codec.init, params),
        jax.tree.map(codec.init, params),
        jax.tree.map(_bf16_zeros, params),
    )

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    leaves, treedef = jax.tree.flatten(grads)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    maxes = treedef.flatten_up_to(state.nu_max)
    out = []
    for i, (g, m, v, v_max) in enumerate(zip(leaves, mus, nus, maxes, strict=True)):
      m = b1 * codec.decode(m) + (1 - b1) * g
      v = b2 * codec.decode(v) + (1 - b2) * g * g
      v_max = jnp.maximum(v_max.astype(jnp.float32), v)
      u = (m / bc1) / (jnp.sqrt(v_max / bc2) + eps)
      out.append((u, codec.encode(m, count, "mu", i), codec.encode(v, count, "nu", i),
                  _rounding.store_max(v_max, jnp.bfloat16, stochastic=True)))
    pick = lambda k: treedef.unflatten([o[k] for o in out])
    return pick(0), PrototypeState(count, pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)


BF16 = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}
VARIANTS: dict[str, Callable[[float, int], optax.GradientTransformation]] = {
    "float32": lambda lr, seed: optax_amsgrad.amsgrad(lr),
    "float32_jitter": lambda lr, seed: optax_amsgrad.amsgrad(lr),
    "bf16_cast": lambda lr, seed: optax_amsgrad.amsgrad(
        lr, **BF16, state_rounding="nearest"
    ),
    "bf16_stochastic": lambda lr, seed: optax_amsgrad.amsgrad(
        lr, **BF16, state_rounding="stochastic", seed=seed
    ),
    "bf16_weyl": lambda lr, seed: optax.chain(
        prototype_amsgrad(WEYL), optax.scale(-lr)
    ),
    "bf16_kahan": lambda lr, seed: optax.chain(
        prototype_amsgrad(KAHAN), optax.scale(-lr)
    ),
}


# The XLA path (what GPUs and TPUs run): the controls below patch
# ``_blockwise``, whose arithmetic the CPU kernel carries in C++.
INT8 = {"mu_dtype": "int8", "nu_dtype": "int8", "implementation": "xla"}


class _EveryLeaf:
  """Within it, every leaf of a new 8-bit state is stored in 8-bit blocks,
  however small (the problems here are mostly small leaves, which the
  library keeps in float32): it measures the codes themselves."""

  def __enter__(self) -> None:
    self.saved = (_blockwise.MIN_SIZE, _blockwise.MIN_ROW)
    _blockwise.MIN_SIZE, _blockwise.MIN_ROW = 0, 1
    # The per-leaf step is jitted at module level: trace it again here.
    _math.leaf_step.clear_cache()

  def __exit__(self, *exc: object) -> None:
    _blockwise.MIN_SIZE, _blockwise.MIN_ROW = self.saved
    _math.leaf_step.clear_cache()


class _RoundedUp(_EveryLeaf):
  """:class:`_EveryLeaf`, with ``nu_max`` rounded up (an upper bound of the
  float32 maximum) instead of to nearest."""

  def __enter__(self) -> None:
    self.rounding = _blockwise.MAX_ROUNDING
    _blockwise.MAX_ROUNDING = "up"
    super().__enter__()

  def __exit__(self, *exc: object) -> None:
    _blockwise.MAX_ROUNDING = self.rounding
    super().__exit__()


def _nearest_max(x: jax.Array, old: Any, needed: Any = None) -> Any:
  """``nu_max`` as 8-bit Adam libraries store their moments: rounded to
  nearest under each step's fresh block scales (it may decrease, or vanish)."""
  del needed
  new_max = jnp.maximum(x, _blockwise.decode(old, _blockwise.NU_CODE))
  return _blockwise.quantize(new_max, _blockwise.NU_CODE, mode="nearest")[0]


class _NearestControl(_EveryLeaf):
  """:class:`_EveryLeaf`, with ``nu_max`` rounded as :func:`_nearest_max`."""

  def __enter__(self) -> None:
    self.store_max = _blockwise.store_max
    _blockwise.store_max = _nearest_max  # type: ignore[assignment]
    super().__enter__()

  def __exit__(self, *exc: object) -> None:
    _blockwise.store_max = self.store_max  # type: ignore[assignment]
    super().__exit__()


# name -> (optimizer, the context its state is made and stepped in)
INT8_VARIANTS: dict[str, tuple[Callable[[float, int], optax.GradientTransformation], Any]] = {
    "float32": (lambda lr, seed: optax_amsgrad.amsgrad(lr), None),
    "float32_jitter": (lambda lr, seed: optax_amsgrad.amsgrad(lr), None),
    "bf16_stochastic": (lambda lr, seed: optax_amsgrad.amsgrad(lr, **BF16, seed=seed), None),
    # The library's defaults: leaves under 4096 elements stay float32.
    "int8": (lambda lr, seed: optax_amsgrad.amsgrad(lr, **INT8, seed=seed), None),
    # Every leaf in 8 bits.
    "int8_all": (lambda lr, seed: optax_amsgrad.amsgrad(lr, **INT8, seed=seed), _EveryLeaf),
    # Every leaf, nu_max rounded up.
    "int8_all_up": (lambda lr, seed: optax_amsgrad.amsgrad(lr, **INT8, seed=seed), _RoundedUp),
    # The control: every leaf, mu and nu rounded to nearest, nu_max rounded
    # to nearest under fresh scales.
    "int8_nearest_all": (
        lambda lr, seed: optax_amsgrad.amsgrad(lr, **INT8, state_rounding="nearest"),
        _NearestControl),
}


def change_summary(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
  """Per variant, the relative change of each run's final loss against its
  ``"float32"`` run: their mean, its standard error and the largest."""
  summary = {}
  for variant in variants:
    changes = np.array([run[variant] / run["float32"] - 1 for run in runs])
    summary[variant] = {
        "mean_relative_change": float(changes.mean()),
        "standard_error": float(changes.std(ddof=1) / np.sqrt(len(changes)))
        if len(changes) > 1 else None,
        "max_abs_relative_change": float(np.abs(changes).max()),
    }
  return summary


def int8_quality(seeds: list[int], steps_scale: float,
                 problems: list[str]) -> dict[str, Any]:
  """Final loss of each 8-bit variant against float32 state, per problem:
  every seed's relative change, their mean and its standard error (the
  float32 state's own noise is the jitter control's)."""
  results: dict[str, Any] = {}
  for name in problems:
    make_problem = INT8_PROBLEMS[name]
    runs = []
    for seed in seeds:
      problem = make_problem(seed)
      problem = problem._replace(steps=max(1, int(problem.steps * steps_scale)))
      run: dict[str, Any] = {"seed": seed}
      for variant, (make, context) in INT8_VARIANTS.items():
        params = _jitter(problem.params, seed) if variant == "float32_jitter" else problem.params
        if context is None:
          final, _, _ = train(problem, make(problem.learning_rate, seed), params)
        else:
          with context():
            final, _, _ = train(problem, make(problem.learning_rate, seed), params)
        run[variant] = final
      runs.append(run)
      print(f"  {name:24s} seed {seed}: float32 {run['float32']:.5g}  " + "  ".join(
          f"{v} x{run[v] / run['float32']:.4f}" for v in INT8_VARIANTS if v != "float32"),
          flush=True)
    summary = change_summary(runs, [v for v in INT8_VARIANTS if v != "float32"])
    problem = make_problem(seeds[0])
    results[name] = {
        "description": make_problem.__doc__.split("\n\n")[0].replace("\n", " "),
        "learning_rate": problem.learning_rate,
        "steps": max(1, int(problem.steps * steps_scale)),
        "runs": runs,
        "summary": summary,
    }
  return results


def int8_memory() -> dict[str, float]:
  """State bytes per parameter on a model of 4.2M params (two matrices and
  their biases), from the state's ``nbytes``."""
  params = {"w1": jnp.zeros((1024, 2048), jnp.float32), "b1": jnp.zeros(2048, jnp.float32),
            "w2": jnp.zeros((2048, 1024), jnp.float32), "b2": jnp.zeros(1024, jnp.float32)}
  size = sum(x.size for x in jax.tree.leaves(params))
  optimizers = {"float32": optax_amsgrad.amsgrad(1e-3),
                "bf16_stochastic": optax_amsgrad.amsgrad(1e-3, **BF16),
                "int8": optax_amsgrad.amsgrad(1e-3, **INT8)}
  return {name: sum(x.nbytes for x in jax.tree.leaves(opt.init(params))) / size
          for name, opt in optimizers.items()}


# The control's perturbation: far below any effect of the state's precision
# (bfloat16 keeps 8 bits, 4e-3 relative), far above float32's resolution, and
# for params that start at zero (biases), a move that is not a subnormal.
JITTER = 1e-6


def _jitter(params: Any, seed: int) -> Any:
  """Moves every parameter by ``JITTER`` relative (zeros by ``JITTER``), up
  or down at random."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(10_000 + seed)
  moved = []
  for leaf in leaves:
    sign = np.where(rng.random(leaf.shape) < 0.5, 1.0, -1.0)
    base = np.where(np.asarray(leaf) == 0, 1.0, np.abs(np.asarray(leaf, np.float64)))
    moved.append(jnp.asarray(np.asarray(leaf, np.float64) + sign * JITTER * base, leaf.dtype))
  return treedef.unflatten(moved)


def _largest_change(after: Any, reference: Any) -> float:
  """max |after - reference| over max |reference|, over all leaves."""
  change = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(after), jax.tree.leaves(reference), strict=True))
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(reference))
  return change / scale


def train(problem: Problem, optimizer: optax.GradientTransformation,
          params: Any) -> tuple[float, np.ndarray, Any]:
  """Final loss, the minibatch loss curve and the final params, all steps in
  one lax.scan."""

  @jax.jit
  def run(params):
    def step(carry, index):
      params, state = carry
      value, grads = jax.value_and_grad(problem.loss)(params, index)
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value

    carry = (params, optimizer.init(params))
    (params, _), curve = jax.lax.scan(step, carry, jnp.arange(problem.steps))
    return problem.final_loss(params), curve, params

  final, curve, params = run(params)
  return float(final), np.asarray(curve), params


def state_bytes_per_param(optimizer: optax.GradientTransformation,
                          params: Any) -> float:
  state = jax.eval_shape(optimizer.init, params)
  leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  size = sum(x.size for x in jax.tree.leaves(params))
  return sum(x.size * x.dtype.itemsize for x in leaves) / size


def quality(seeds: list[int], steps_scale: float) -> dict[str, Any]:
  results: dict[str, Any] = {}
  for name, make_problem in PROBLEMS.items():
    runs = []
    for seed in seeds:
      problem = make_problem(seed)
      problem = problem._replace(steps=max(1, int(problem.steps * steps_scale)))
      run: dict[str, Any] = {"seed": seed}
      for variant, make in VARIANTS.items():
        params = problem.params
        if variant == "float32_jitter":
          params = _jitter(params, seed)
        final, curve, trained = train(problem, make(problem.learning_rate, seed), params)
        run[variant] = final
        if variant == "float32":
          reference_params = trained
        if variant == "float32_jitter":
          run["control_moved"] = _largest_change(trained, reference_params)
        if variant == "float32":
          run["initial_loss"] = float(curve[0])
          # Still converging: the loss over the last tenth of the budget,
          # against the tenth before it.
          tenth = max(1, problem.steps // 10)
          run["last_tenth_improvement"] = float(
              1 - curve[-tenth:].mean() / curve[-2 * tenth:-tenth].mean()
          )
      runs.append(run)
      ratios = {v: run[v] / run["float32"] for v in VARIANTS if v != "float32"}
      print(f"  {name:14s} seed {seed}: float32 {run['float32']:.5g}  " + "  ".join(
          f"{v} x{r:.4f}" for v, r in ratios.items()), flush=True)
    summary = {}
    for variant in VARIANTS:
      if variant == "float32":
        continue
      deviation = [abs(run[variant] / run["float32"] - 1) for run in runs]
      signed = [run[variant] / run["float32"] - 1 for run in runs]
      summary[variant] = {
          "max_abs_relative_change": max(deviation),
          "mean_relative_change": statistics.fmean(signed),
      }
    problem = make_problem(seeds[0])
    results[name] = {
        "description": make_problem.__doc__.split("\n\n")[0].replace("\n", " "),
        "learning_rate": problem.learning_rate,
        "steps": max(1, int(problem.steps * steps_scale)),
        "runs": runs,
        "summary": summary,
        # The control moved every run's final params at least this much.
        "control_moved": min(run["control_moved"] for run in runs),
    }
  return results


def rounding_bias(steps: int, size: int) -> dict[str, Any]:
  """Mean relative error of the stored nu and nu_max against float32 state
  fed the same gradients (open loop), for gradient patterns with and without
  a short period. Each coordinate gets its own scale, spread over 6 decades
  to cover many exponents."""
  key = jax.random.PRNGKey(0)
  scales = jnp.exp(jax.random.uniform(key, (size,), minval=-7, maxval=7))
  patterns = {
      "gaussian": lambda i: jax.random.normal(jax.random.fold_in(key, i), (size,)),
      "period_3": lambda i: jnp.where(i % 3 == 0, 2.0, 0.5) * jnp.ones(size),
      "constant": lambda i: jnp.full((size,), 1.1),
  }
  variants = {
      "float32": (optax_amsgrad.scale_by_amsgrad(), lambda s: (s.nu, s.nu_max)),
      "bf16_cast": (optax_amsgrad.scale_by_amsgrad(**BF16, state_rounding="nearest"),
                    lambda s: (s.nu, s.nu_max)),
      "bf16_stochastic": (optax_amsgrad.scale_by_amsgrad(**BF16),
                          lambda s: (s.nu, s.nu_max)),
      "bf16_weyl": (prototype_amsgrad(WEYL),
                    lambda s: (WEYL.decode(s.nu), s.nu_max)),
  }
  out: dict[str, Any] = {"steps": steps, "size": size}
  for pattern, gradient in patterns.items():

    def final(transform, read, gradient=gradient):
      @jax.jit
      def run():
        def step(state, i):
          _, state = transform.update(gradient(i) * scales, state)
          return state, None

        state, _ = jax.lax.scan(step, transform.init(scales), jnp.arange(steps))
        return [x.astype(jnp.float32) for x in read(state)]

      return run()

    nu32, max32 = final(*variants["float32"])
    out[pattern] = {}
    for name, (transform, read) in variants.items():
      if name == "float32":
        continue
      nu, nu_max = final(transform, read)
      out[pattern][name] = {
          "nu_mean_relative_error": float(jnp.mean(nu / nu32 - 1)),
          "nu_rms_relative_error": float(jnp.sqrt(jnp.mean((nu / nu32 - 1) ** 2))),
          "nu_max_mean_relative_error": float(jnp.mean(nu_max / max32 - 1)),
      }
  return out


def memory() -> dict[str, float]:
  params = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}
  optimizers = {
      "float32": optax_amsgrad.scale_by_amsgrad(),
      "bf16_cast": optax_amsgrad.scale_by_amsgrad(**BF16, state_rounding="nearest"),
      "bf16_stochastic": optax_amsgrad.scale_by_amsgrad(**BF16),
      "bf16_weyl": prototype_amsgrad(WEYL),
      "bf16_kahan": prototype_amsgrad(KAHAN),
  }
  return {k: state_bytes_per_param(opt, params) for k, opt in optimizers.items()}


def step_time(size: int, repeats: int) -> dict[str, Any]:
  """Median seconds of one donated step of a single ``size`` leaf, taken by
  ``update`` and ``optax.apply_updates`` and by ``optax_amsgrad.apply_step``."""
  grads = jax.random.normal(jax.random.PRNGKey(0), (size,), jnp.float32)
  optimizers = {
      "float32": optax_amsgrad.amsgrad(1e-3),
      "bf16_cast": optax_amsgrad.amsgrad(1e-3, **BF16, state_rounding="nearest"),
      "bf16_stochastic": optax_amsgrad.amsgrad(1e-3, **BF16),
  }
  state_bytes = {"float32": 12, "bf16_cast": 6, "bf16_stochastic": 6}
  # name -> (optimizer, its state, how the step is taken)
  variants = {
      f"{kind}{call}": (optimizer, kind, call)
      for call in ("", ".apply_step")
      for kind, optimizer in optimizers.items()
  }
  runners: dict[str, list[Any]] = {}
  for name, (optimizer, _, call) in variants.items():

    def step(params, grads, state, optimizer=optimizer, call=call):
      if call:
        return optax_amsgrad.apply_step(optimizer, grads, state, params)
      updates, state = optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 2))
    params = jnp.zeros(size, jnp.float32)
    state = optimizer.init(params)
    analysis = compiled.lower(params, grads, state).compile().memory_analysis()
    params, state = compiled(params, grads, state)
    jax.block_until_ready((params, state))
    runners[name] = [compiled, params, state,
                     getattr(analysis, "temp_size_in_bytes", None)]

  stream = jax.jit(lambda a, b: a + jnp.float32(0.5) * b, donate_argnums=0)
  a = jnp.zeros(size, jnp.float32)
  a = jax.block_until_ready(stream(a, grads))
  times: dict[str, list[float]] = {name: [] for name in [*variants, "stream"]}
  for _ in range(repeats):
    for name in variants:
      compiled, params, state, _ = runners[name]
      start = time.perf_counter()
      params, state = compiled(params, grads, state)
      jax.block_until_ready((params, state))
      times[name].append(time.perf_counter() - start)
      runners[name][1:3] = [params, state]
    start = time.perf_counter()
    a = jax.block_until_ready(stream(a, grads))
    times["stream"].append(time.perf_counter() - start)

  median = {name: statistics.median(t) for name, t in times.items()}
  # a + s*b reads two arrays and writes one.
  bandwidth = 12 * size / median["stream"]
  out: dict[str, Any] = {
      "size": size,
      "repeats": repeats,
      "stream_bandwidth_GBps": bandwidth / 1e9,
  }
  for name, (_, kind, call) in variants.items():
    # Read g and p, write p, read and write the three state buffers.
    moved = (12 + 2 * state_bytes[kind]) * size
    out[name] = {
        "median_ms": 1e3 * median[name],
        "min_ms": 1e3 * min(times[name]),
        "bytes_moved_per_param": moved / size,
        "fraction_of_bandwidth_limit": moved / bandwidth / median[name],
        "temp_bytes": runners[name][3],
        # Against float32 state taken the same way.
        "ratio_to_float32": median[name] / median[f"float32{call}"],
    }
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="2 seeds, a fifth of the steps, 1e6 params timed")
  parser.add_argument("--size", type=int, default=10_000_000)
  parser.add_argument("--repeats", type=int, default=41)
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--out", "--output", dest="out",
                      default=os.path.join(RESULTS, "state_precision.json"),
                      help="JSON output path")
  parser.add_argument("--int8", action="store_true",
                      help="the 8-bit state's rows instead, into state_precision_int8.json")
  args = parser.parse_args(argv)
  if args.int8:
    return int8_main(args, argv)
  seeds = list(range(2 if args.quick else args.seeds))
  steps_scale = 0.2 if args.quick else 1.0
  size = 1_000_000 if args.quick else args.size

  print("quality: final loss relative to float32 state", flush=True)
  meta = provenance(command_line("state_precision.py", argv), packages=CORE_PACKAGES,
                    quick=args.quick)
  meta["machine"]["device"] = str(jax.devices()[0])
  report: dict[str, Any] = {
      "meta": meta,
      "quality": quality(seeds, steps_scale),
      "state_bytes_per_param": memory(),
      "rounding_bias": rounding_bias(600 if args.quick else 3000, 20_000),
  }
  print("rounding bias (open loop):", json.dumps(report["rounding_bias"], indent=1))
  print("state bytes per parameter:", report["state_bytes_per_param"])
  if not args.skip_timing:
    report["step_time"] = step_time(size, args.repeats)
    print("step time:", json.dumps(report["step_time"], indent=1))
  print("summary (max |final loss / float32 - 1| over seeds):")
  for name, result in report["quality"].items():
    print(f"  {name:14s} " + "  ".join(
        f"{v} {s['max_abs_relative_change']:.2%}"
        for v, s in result["summary"].items()))
  meta["machine"]["load_average_end"] = load_average()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as file:
    json.dump(report, file, indent=1)
  print("wrote", args.out)
  return 0


def int8_main(args: argparse.Namespace, argv: list[str] | None) -> int:
  """``--int8``: the 8-bit state against float32 and bfloat16 state."""
  seeds = list(range(2 if args.quick else args.seeds))
  steps_scale = 0.2 if args.quick else 1.0
  out = args.out
  if out == os.path.join(RESULTS, "state_precision.json"):
    out = os.path.join(RESULTS, "state_precision_int8.json")
  meta = provenance(command_line("state_precision.py", argv), packages=CORE_PACKAGES,
                    quick=args.quick)
  meta["machine"]["device"] = str(jax.devices()[0])
  print("quality: final loss relative to float32 state", flush=True)
  report: dict[str, Any] = {
      "meta": meta,
      "quality": int8_quality(seeds, steps_scale, list(INT8_PROBLEMS)),
      "state_bytes_per_param": int8_memory(),
  }
  print("state bytes per parameter:", report["state_bytes_per_param"])
  print("summary (mean relative change of the final loss +- standard error):")
  for name, result in report["quality"].items():
    print(f"  {name:24s} " + "  ".join(
        f"{v} {s['mean_relative_change']:+.2%}+-{s['standard_error'] or 0:.2%}"
        for v, s in result["summary"].items()))
  meta["machine"]["load_average_end"] = load_average()
  with open(out, "w") as file:
    json.dump(report, file, indent=1)
  print("wrote", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
