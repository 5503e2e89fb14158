"""Gradient sequences for the tests: Gaussian noise with rare large spikes,
the regime where AMSGrad's maximum differs from Adam's average."""

from __future__ import annotations

import numpy as np

TREE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "single": {"w": (7,)},
    "mixed": {"kernel": (4, 3), "bias": (3,), "scalar": ()},
    "deep": {"a": (2, 2, 2), "b": (5,), "c": (1,), "d": (3, 1)},
}


def spiky_gradients(
    shapes: dict[str, tuple[int, ...]],
    steps: int,
    *,
    seed: int = 0,
    spike_probability: float = 0.01,
    spike_scale: float = 100.0,
    dtype: type = np.float64,
) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  sequence = []
  for _ in range(steps):
    step = {}
    for name, shape in shapes.items():
      g = rng.normal(size=shape)
      spikes = rng.random(size=shape) < spike_probability
      g = np.where(spikes, spike_scale * g, g)
      if np.issubdtype(dtype, np.complexfloating):
        g = g + 1j * rng.normal(size=shape)
      step[name] = g.astype(dtype)
    sequence.append(step)
  return sequence


def initial_params(
    shapes: dict[str, tuple[int, ...]], *, seed: int = 1, dtype: type = np.float64
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in shapes.items():
    p = rng.normal(size=shape)
    if np.issubdtype(dtype, np.complexfloating):
      p = p + 1j * rng.normal(size=shape)
    params[name] = p.astype(dtype)
  return params
