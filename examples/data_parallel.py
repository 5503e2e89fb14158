"""Data-parallel training with AMSGrad on 8 devices.

The batch is split across the devices; the parameters and the AMSGrad state
are either replicated on every device (``--layout replicated``, plain data
parallelism) or split across the devices along their first axis
(``--layout fsdp``, fully sharded: each device holds 1/8 of every weight and of
its ``mu``, ``nu`` and ``nu_max``). ``jax.jit`` compiles the same training step
for both and XLA inserts the communication itself: the gradient all-reduce,
and with FSDP the all-gathers of the weights for the forward pass. The AMSGrad
update needs none: each device updates its own slice. The run is compared with
the same training on a single device.

Eight CPU devices stand in for accelerators here: the environment settings at
the top ask XLA for them when the file runs as a script. On a machine with 8
GPUs or TPUs, delete them.

Run it with::

  python examples/data_parallel.py --layout fsdp
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  # Before JAX is imported: eight host (CPU) devices for the demonstration.
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import itertools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_amsgrad

LAYER_SIZES = (32, 256, 256, 1)
BATCH = 256
STEPS = 100
LEARNING_RATE = 1e-3

# An HLO instruction is `%name = shape opcode(operands), ...`: match the opcode.
_COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """A fixed regression problem: inputs, targets and initial params (float32)."""
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(STEPS, BATCH, LAYER_SIZES[0])).astype(np.float32)
  teacher = rng.normal(size=(LAYER_SIZES[0], 1)) / np.sqrt(LAYER_SIZES[0])
  targets = np.sin(2 * inputs @ teacher).astype(np.float32)
  params = {}
  for i, (n_in, n_out) in enumerate(itertools.pairwise(LAYER_SIZES)):
    params[f"w{i}"] = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    params[f"b{i}"] = np.zeros((n_out,), np.float32)
  return inputs, targets, params


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of a tanh MLP, averaged over the (global) batch."""
  h = x
  n_layers = len(LAYER_SIZES) - 1
  for i in range(n_layers):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < n_layers - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def param_specs(params: dict[str, Any], layout: str, n_devices: int) -> dict[str, P]:
  """Replicated: every device holds everything. FSDP: split the first axis of
  every leaf whose first axis divides evenly, replicate the rest."""
  if layout == "replicated":
    return {name: P() for name in params}
  return {
      name: P("data") if p.ndim and p.shape[0] % n_devices == 0 else P()
      for name, p in params.items()
  }


def train(
    devices: Sequence[jax.Device], layout: str = "replicated"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Trains on ``devices`` (one device: the single-device run).

  Returns the final params and facts about the run: the final loss, the
  AMSGrad state's bytes in all and on each device, whether every state leaf
  has its param's sharding, and the collectives in the compiled step.
  """
  inputs, targets, params = make_data()
  # Auto axes: the compiler chooses where intermediate values live and
  # inserts the collectives.
  mesh = jax.make_mesh(
      (len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices
  )
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))  # examples split across devices
  param_shardings = {
      name: NamedSharding(mesh, spec)
      for name, spec in param_specs(params, layout, len(devices)).items()
  }

  optimizer = optax_amsgrad.amsgrad(LEARNING_RATE)
  params = jax.device_put(params, param_shardings)
  state = optimizer.init(params)  # mu, nu, nu_max: sharded like the params

  def train_step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(
      train_step,
      in_shardings=(param_shardings, None, batch, batch),
      out_shardings=(param_shardings, None, replicated),
      donate_argnums=(0, 1),
  )
  x, y = jax.device_put((inputs[0], targets[0]), batch)
  hlo = step.lower(params, state, x, y).compile().as_text()

  for t in range(STEPS):
    x, y = jax.device_put((inputs[t], targets[t]), batch)
    params, state, loss = step(params, state, x, y)
    if t == 0:
      first_loss = float(loss)
    # Keep the host at most one step ahead. On XLA's CPU runtime, many steps
    # queued ahead with in-process collectives can deadlock.
    loss.block_until_ready()

  moments = (state[0].mu, state[0].nu, state[0].nu_max)
  leaves = jax.tree.leaves(moments)
  facts = {
      "first_loss": first_loss,
      "loss": float(loss),
      "state_bytes_total": sum(leaf.nbytes for leaf in leaves),
      "state_bytes_per_device": max(
          sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
              if s.device == device)
          for device in devices
      ),
      "state_sharded_like_params": all(
          leaf.sharding.is_equivalent_to(param_shardings[name], leaf.ndim)
          for tree in moments
          for name, leaf in tree.items()
      ),
      "collectives": count_collectives(hlo),
  }
  return jax.tree.map(np.asarray, params), facts


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Cross-device operations in compiled HLO text, by kind (an asynchronous
  ``all-gather-start``/``-done`` pair counts once)."""
  counts: dict[str, int] = {}
  for match in _COLLECTIVE.finditer(hlo_text):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layout", choices=("replicated", "fsdp"), default="replicated")
  args = parser.parse_args()
  devices = jax.devices()[:8]
  single, single_facts = train(devices[:1])
  sharded, facts = train(devices, args.layout)
  difference = max(
      float(np.max(np.abs(sharded[k] - single[k])) / np.max(np.abs(single[k])))
      for k in single
  )
  print(f"layout: {args.layout} on {len(devices)} devices, {STEPS} steps")
  print(
      f"loss: {facts['first_loss']:.6f} -> {facts['loss']:.6f} "
      f"(single device: {single_facts['first_loss']:.6f} -> {single_facts['loss']:.6f})"
  )
  print(f"max relative difference from the single-device params: {difference:.2e}")
  print(
      f"AMSGrad state: {facts['state_bytes_total']} bytes in all, "
      f"{facts['state_bytes_per_device']} bytes on each device"
  )
  print(f"collectives in the compiled step: {facts['collectives']}")


if __name__ == "__main__":
  main()
