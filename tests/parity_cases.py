"""The framework parity cases: each pairs a framework's AMSGrad with the
optax_amsgrad optimizer that must reproduce it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optax

import optax_amsgrad

from frameworks import keras_trajectory, torch_trajectory
from gradients import TREE_SHAPES, initial_params, spiky_gradients

STEPS = 1000
# Keras keeps the learning rate in a float32 variable; a power of two is the
# same in float32 and float64, so the float64 comparison is exact.
KERAS_LR = 2.0**-7


@dataclass(frozen=True)
class ParityCase:
  name: str
  framework: str  # "torch", "keras" or "optax"
  run_framework: Callable[..., list[dict[str, np.ndarray]]]
  framework_options: dict[str, Any]
  ours: Callable[[], optax.GradientTransformation]
  seed: int
  dtype: type = np.float64
  shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: TREE_SHAPES["mixed"])

  def inputs(self) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    grads = spiky_gradients(self.shapes, STEPS, seed=self.seed, dtype=self.dtype)
    return grads, initial_params(self.shapes, seed=self.seed + 1, dtype=self.dtype)


def _optax_trajectory(grads, params, **options):
  from trajectories import run_optax

  return run_optax(optax.amsgrad(**options), grads, params)


CASES = [
    ParityCase(
        "torch_adam", "torch", torch_trajectory, {"lr": 1e-2},
        lambda: optax_amsgrad.amsgrad(1e-2), seed=100,
    ),
    ParityCase(
        "torch_adam_hyperparameters", "torch", torch_trajectory,
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        lambda: optax_amsgrad.amsgrad(3e-3, b1=0.8, b2=0.99, eps=1e-6), seed=110,
    ),
    ParityCase(
        "torch_adam_coupled_l2", "torch", torch_trajectory,
        {"lr": 1e-2, "weight_decay": 0.1},
        lambda: optax.chain(optax.add_decayed_weights(0.1), optax_amsgrad.amsgrad(1e-2)),
        seed=120,
    ),
    ParityCase(
        "torch_adamw", "torch", torch_trajectory,
        {"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 0.1},
        lambda: optax_amsgrad.amsgradw(1e-2, weight_decay=0.1), seed=130,
    ),
    ParityCase(
        "torch_adam_complex", "torch", torch_trajectory, {"lr": 1e-2},
        lambda: optax_amsgrad.amsgrad(1e-2), seed=140, dtype=np.complex128,
    ),
    ParityCase(
        "keras_adam", "keras", keras_trajectory,
        {"learning_rate": KERAS_LR, "epsilon": 1e-7},
        lambda: optax_amsgrad.amsgrad(KERAS_LR, eps=1e-7, convention="keras"), seed=200,
    ),
    ParityCase(
        "keras_adamw", "keras", keras_trajectory,
        {"optimizer": "AdamW", "learning_rate": KERAS_LR, "epsilon": 1e-7,
         "weight_decay": 0.125},
        lambda: optax_amsgrad.amsgradw(
            KERAS_LR, eps=1e-7, weight_decay=0.125, convention="keras"
        ),
        seed=210,
    ),
    ParityCase(
        "optax_amsgrad", "optax", _optax_trajectory, {"learning_rate": 1e-2},
        lambda: optax_amsgrad.amsgrad(1e-2, convention="optax"), seed=300,
    ),
]
