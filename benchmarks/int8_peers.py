"""The nearest 8-bit peer in PyTorch: torchao's ``AdamW8bit`` against float32
state ``torch.optim.AdamW``, on the problems of ``state_precision.py --int8``.

torchao 0.18's ``AdamW8bit`` stores ``exp_avg`` and ``exp_avg_sq`` as uint8
codes of a dynamic map with one float32 absmax scale per block of 256,
requantized to nearest under each step's fresh scales. It does not run with
``amsgrad=True`` (the script records the exception), so it is compared
without AMSGrad's maximum, against ``torch.optim.AdamW`` with the same
hyperparameters (lr, betas (0.9, 0.999), eps 1e-8, weight_decay 0, amsgrad
False). Variants, per problem and seed:

* ``float32``: ``torch.optim.AdamW`` (the reference),
* ``float32_jitter``: the same, started from the initial params perturbed
  as by ``state_precision._jitter`` (relative ``JITTER``, zeros by
  ``JITTER``, up or down at random): the noise of float32 state itself,
* ``torchao_float32``: torchao's ``_AdamW``, the same compiled step as
  ``AdamW8bit`` with float32 state: what torchao's arithmetic alone moves,
* ``adamw8bit``: ``torchao.optim.AdamW8bit``.

Each row is, per seed, the final loss over the float32 run's, less 1; then
their mean and its standard error (ddof=1), as ``int8_quality`` reports them.
Every run also records its loss on all training data, and the float32 and
8-bit runs how many elements of the final ``exp_avg_sq`` read back as 0
(where ``exp_avg`` is not 0, AdamW's step there is ``lr * m / eps``).

Which params torchao keeps in 8 bits: ``_AdamBase._new_buffer`` in
``torchao/optim/adam.py`` quantizes a state tensor only when its param has
at least 4096 elements and a multiple of ``block_size`` (256); every other
state tensor is float32. The script counts them from the optimizer's state
(``OptimState8bit`` tensors: uint8 codes, float32 block scales and a
256-entry float32 map each) and reports the state's bytes per parameter.

The problems are ``digits`` (64-64-10 ReLU MLP, training cross-entropy on
all 1797 images) and ``digits_cnn`` (the CNN, cross-entropy on the 400
held-out images) of ``state_precision.py``, written in PyTorch with the
same data, split, batch size, learning rate and step count. They start from
the same initial params (taken from ``state_precision.py``'s problems, in
JAX's layouts) and draw the same minibatch indices (``jax.random.randint``
with the seed's key folded with the step, as there), so the float32 run
trains on the JAX script's data order; the record holds both frameworks'
first minibatch loss as a check. These are AdamW runs, not AMSGrad: compare
the relative changes with the JAX rows, not the losses.

Install the peer with the project's ``peers`` extra (torchao has no
dependencies of its own; torch stays the pinned 2.13 CPU build)::

  pip install -e ".[peers]"

Run (about 6 minutes on 2 CPU cores, one thread; most of it torch.compile
and torchao's compiled steps)::

  python benchmarks/int8_peers.py [--quick] [--seeds N]

It writes ``benchmarks/results/int8_peers.json`` (or ``--out``), with the
commit, machine and versions of the run, and prints a summary. ``--quick``
runs 2 seeds and a fifth of the steps (a smoke test, not the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import state_precision
import torch
import torch._inductor.config
import torch.nn.functional as F
import torchao
import torchao.optim
from machine import CORE_PACKAGES, command_line, load_average, provenance
from torchao.optim.subclass_8bit import OptimState8bit

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HYPER = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
BATCH = 64


class Problem(NamedTuple):
  """``loss(params, x, y)`` is the mean cross-entropy of ``params`` (a
  pytree of torch tensors in JAX's layouts); step ``i`` trains on
  ``x[indices[i]]``; the final loss is taken on ``x_final``, ``y_final``."""

  loss: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
  params: Any  # the JAX problem's initial params (jax arrays)
  x: torch.Tensor
  y: torch.Tensor
  indices: torch.Tensor
  x_final: torch.Tensor
  y_final: torch.Tensor
  learning_rate: float
  steps: int
  jax_first_loss: float  # the JAX problem's loss of step 0


def _indices(seed: int, steps: int, n: int) -> torch.Tensor:
  """The JAX problems' minibatches: step ``i`` draws
  ``randint(fold_in(PRNGKey(seed), i), (64,), 0, n)``."""
  key = jax.random.PRNGKey(seed)
  draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (BATCH,), 0, n)
  return torch.from_numpy(np.asarray(jax.vmap(draw)(jnp.arange(steps))).astype(np.int64))


def _mlp_loss(layers: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  for layer in layers[:-1]:
    x = torch.relu(x @ layer["w"] + layer["b"])
  return F.cross_entropy(x @ layers[-1]["w"] + layers[-1]["b"], y)


def _cnn_loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  # x is NHWC and the kernels HWIO, as in JAX; the dense layer reads the
  # features in HWC order.
  conv = lambda h, w: F.conv2d(h, w.permute(3, 2, 0, 1), padding="same")
  h = torch.relu(conv(x.permute(0, 3, 1, 2), p["conv1"]) + p["b1"][:, None, None])
  h = torch.relu(conv(h, p["conv2"]) + p["b2"][:, None, None])
  h = torch.relu(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ p["dense"] + p["b3"])
  return F.cross_entropy(h @ p["out"] + p["b4"], y)


def digits(seed: int, steps_scale: float) -> Problem:
  """scikit-learn's 8x8 digits (1797 images), a 64-64-10 ReLU MLP with
  softmax cross-entropy, minibatches of 64; the final loss is the training
  cross-entropy on all images."""
  from sklearn.datasets import load_digits

  data = load_digits()
  x = torch.tensor(data.data / 16.0, dtype=torch.float32)
  y = torch.tensor(data.target, dtype=torch.int64)
  reference = state_precision.digits(seed)
  steps = max(1, int(reference.steps * steps_scale))
  return Problem(_mlp_loss, reference.params, x, y, _indices(seed, steps, len(y)), x, y,
                 reference.learning_rate, steps,
                 float(reference.loss(reference.params, jnp.int32(0))))


def digits_cnn(seed: int, steps_scale: float) -> Problem:
  """scikit-learn's 8x8 digits split into 1397 training and 400 held-out
  images (by the seed), a CNN (two 3x3 ReLU convolutions of 16 and 32
  channels, a dense layer of 64, softmax over 10), minibatches of 64; the
  final loss is the cross-entropy on the held-out images."""
  from sklearn.datasets import load_digits

  data = load_digits()
  order = np.random.default_rng(seed).permutation(len(data.target))
  images = torch.tensor(data.images[order, :, :, None] / 16.0, dtype=torch.float32)
  labels = torch.tensor(data.target[order], dtype=torch.int64)
  reference = state_precision.digits_cnn(seed)
  steps = max(1, int(reference.steps * steps_scale))
  return Problem(_cnn_loss, reference.params, images[400:], labels[400:],
                 _indices(seed, steps, len(labels) - 400), images[:400], labels[:400],
                 reference.learning_rate, steps,
                 float(reference.loss(reference.params, jnp.int32(0))))


PROBLEMS: dict[str, Callable[[int, float], Problem]] = {
    "digits": digits, "digits_cnn": digits_cnn}

# name -> optimizer of (params, learning rate)
Optimizer = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]
VARIANTS: dict[str, Optimizer] = {
    "float32": lambda p, lr: torch.optim.AdamW(p, lr, amsgrad=False, **HYPER),
    "float32_jitter": lambda p, lr: torch.optim.AdamW(p, lr, amsgrad=False, **HYPER),
    "torchao_float32": lambda p, lr: torchao.optim._AdamW(p, lr, amsgrad=False, **HYPER),
    "adamw8bit": lambda p, lr: torchao.optim.AdamW8bit(p, lr, amsgrad=False, **HYPER),
}


def train(problem: Problem, make: Optimizer, params: Any
          ) -> tuple[float, float, list[torch.Tensor], torch.optim.Optimizer]:
  """Final loss, the loss on all training data, the trained leaves and the
  optimizer (with its state)."""
  tree = jax.tree.map(lambda a: torch.tensor(np.asarray(a)).requires_grad_(), params)
  leaves = jax.tree.leaves(tree)
  optimizer = make(leaves, problem.learning_rate)
  for step in range(problem.steps):
    index = problem.indices[step]
    loss = problem.loss(tree, problem.x[index], problem.y[index])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
  with torch.no_grad():
    final = problem.loss(tree, problem.x_final, problem.y_final)
    train_loss = problem.loss(tree, problem.x, problem.y)
  return float(final), float(train_loss), leaves, optimizer


def second_moment_zeros(optimizer: torch.optim.Optimizer,
                        leaves: list[torch.Tensor]) -> dict[str, int]:
  """Elements whose stored ``exp_avg_sq`` reads back as 0, and those of
  them whose ``exp_avg`` does not (their step is ``lr * m / eps``)."""
  zeros = live = 0
  for leaf in leaves:
    state = optimizer.state[leaf]
    read = lambda x: x.dequantize() if isinstance(x, OptimState8bit) else x
    zero = read(state["exp_avg_sq"]) == 0
    zeros += int(zero.sum())
    live += int((zero & (read(state["exp_avg"]) != 0)).sum())
  return {"exp_avg_sq_zeros": zeros, "of_them_exp_avg_nonzero": live}


def state_count(optimizer: torch.optim.Optimizer, names: list[str],
                leaves: list[torch.Tensor]) -> dict[str, Any]:
  """Params whose two moments are stored in 8 bits, and the state's bytes,
  read from the optimizer's state tensors (an ``OptimState8bit`` counts its
  codes, block scales and map; the ``step`` counters are included)."""
  total = eight_bit = state_bytes = coded_bytes = 0
  table = []
  for name, leaf in zip(names, leaves, strict=True):
    state = optimizer.state[leaf]
    quantized = all(isinstance(state[k], OptimState8bit) for k in ("exp_avg", "exp_avg_sq"))
    for value in state.values():
      if isinstance(value, OptimState8bit):
        coded_bytes += value.codes.nbytes + value.scale.nbytes
        state_bytes += value.codes.nbytes + value.scale.nbytes + value.qmap.nbytes
      else:
        state_bytes += value.nbytes
    total += leaf.numel()
    eight_bit += leaf.numel() if quantized else 0
    table.append({"param": name, "shape": list(leaf.shape), "size": leaf.numel(),
                  "8bit": quantized})
  return {
      "params": total,
      "params_8bit": eight_bit,
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / total,
      # Codes and block scales of both moments, per param stored in 8 bits.
      "coded_bytes_per_8bit_param": coded_bytes / eight_bit if eight_bit else None,
      "leaves": table,
  }


def amsgrad_attempt() -> dict[str, Any]:
  """What ``AdamW8bit(amsgrad=True)`` does on its first step over a 64x64
  param (large enough to be stored in 8 bits)."""
  param = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
  optimizer = torchao.optim.AdamW8bit([param], 1e-3, amsgrad=True, **HYPER)
  param.grad = torch.ones_like(param)
  try:
    optimizer.step()
  except Exception as error:  # record whatever it raises
    cause = error.__cause__
    return {"raised": True, "type": f"{type(error).__module__}.{type(error).__name__}",
            "message": str(error).split("\n\nSet TORCHDYNAMO_VERBOSE")[0],
            "cause": None if cause is None else f"{type(cause).__name__}: {cause}"}
  return {"raised": False, "max_exp_avg_sq_type": type(
      optimizer.state[param]["max_exp_avg_sq"]).__name__}


def quality(seeds: list[int], steps_scale: float) -> dict[str, Any]:
  """Per problem: every seed's final loss per variant, the relative changes
  against float32 with their mean and standard error, and the state counts."""
  results: dict[str, Any] = {}
  for name, make_problem in PROBLEMS.items():
    runs = []
    for seed in seeds:
      problem = make_problem(seed, steps_scale)
      run: dict[str, Any] = {"seed": seed, "jax_first_minibatch_loss": problem.jax_first_loss}
      for variant, make in VARIANTS.items():
        params = problem.params
        if variant == "float32_jitter":
          params = state_precision._jitter(params, seed)
        start = time.perf_counter()
        run[variant], run[f"{variant}_train_loss"], leaves, optimizer = train(
            problem, make, params)
        run[f"{variant}_seconds"] = time.perf_counter() - start
        if variant in ("float32", "adamw8bit"):
          run[f"{variant}_state_zeros"] = second_moment_zeros(optimizer, leaves)
        if seed == seeds[0] and variant in ("float32", "adamw8bit"):
          names = [jax.tree_util.keystr(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(problem.params)[0]]
          results.setdefault(name, {"state": {}})["state"][variant] = state_count(
              optimizer, names, leaves)
      tree = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), problem.params)
      with torch.no_grad():
        index = problem.indices[0]
        run["torch_first_minibatch_loss"] = float(
            problem.loss(tree, problem.x[index], problem.y[index]))
      runs.append(run)
      print(f"  {name:12s} seed {seed}: float32 {run['float32']:.5g}  " + "  ".join(
          f"{v} x{run[v] / run['float32']:.5f}" for v in VARIANTS if v != "float32"),
          flush=True)
    summary = state_precision.change_summary(runs, [v for v in VARIANTS if v != "float32"])
    results[name].update({
        "description": make_problem.__doc__.split("\n\n")[0].replace("\n", " "),
        "learning_rate": problem.learning_rate,
        "steps": problem.steps,
        "batch": BATCH,
        "runs": runs,
        "summary": summary,
    })
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="2 seeds, a fifth of the steps")
  parser.add_argument("--out", default=os.path.join(RESULTS, "int8_peers.json"),
                      help="JSON output path")
  args = parser.parse_args(argv)
  # One thread: the figures are losses, not times, and the machine is shared.
  torch.set_num_threads(1)
  torch._inductor.config.compile_threads = 1
  seeds = list(range(2 if args.quick else args.seeds))
  steps_scale = 0.2 if args.quick else 1.0
  meta = provenance(command_line("int8_peers.py", argv),
                    packages=(*CORE_PACKAGES, "torch", "torchao"), quick=args.quick)
  meta["machine"]["torch_threads"] = torch.get_num_threads()
  start = time.perf_counter()
  report: dict[str, Any] = {"meta": meta, "amsgrad_true": amsgrad_attempt()}
  print("AdamW8bit(amsgrad=True):", report["amsgrad_true"]["type"]
        if report["amsgrad_true"]["raised"] else "ran", flush=True)
  print("quality: final loss relative to float32 AdamW", flush=True)
  report["quality"] = quality(seeds, steps_scale)
  meta["wall_seconds"] = time.perf_counter() - start
  meta["machine"]["load_average_end"] = load_average()
  print("summary (mean relative change of the final loss +- standard error; "
        "params in 8-bit state):")
  for name, result in report["quality"].items():
    state = result["state"]["adamw8bit"]
    print(f"  {name:12s} " + "  ".join(
        f"{v} {s['mean_relative_change']:+.3%}+-{s['standard_error'] or 0:.3%}"
        for v, s in result["summary"].items())
        + f"  | 8-bit {state['params_8bit']}/{state['params']}"
        f", {state['state_bytes_per_param']:.3f} B/param"
        f" (float32 {result['state']['float32']['state_bytes_per_param']:.3f})")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as file:
    json.dump(report, file, indent=1)
  print("wrote", args.out, f"in {meta['wall_seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
