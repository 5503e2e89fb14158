"""An independent float64 NumPy AMSGrad, written from the formulas of each
convention (DESIGN.md section 2), for checking the package against.

It shares no code with ``optax_amsgrad``: every formula is spelled out as the
framework writes it, step by step, in float64 (complex128 for complex input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferenceAmsgrad:
  """AMSGrad on one array. ``step(g)`` returns the update u (apply -lr*u)."""

  shape: tuple[int, ...]
  b1: float | Callable[[int], float] = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  eps_root: float = 0.0
  convention: str = "pytorch"
  complex_params: bool = False
  t: int = 0
  m: np.ndarray = field(init=False)
  v: np.ndarray = field(init=False)
  v_max: np.ndarray = field(init=False)

  def __post_init__(self) -> None:
    self.m = np.zeros(self.shape, np.complex128 if self.complex_params else np.float64)
    split = self.complex_params and self.convention == "pytorch"
    v_dtype = np.complex128 if split else np.float64
    self.v = np.zeros(self.shape, v_dtype)
    self.v_max = np.zeros(self.shape, v_dtype)

  def step(self, g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.complex128 if self.complex_params else np.float64)
    if self.complex_params and self.convention == "pytorch":
      # PyTorch views a complex tensor as pairs of reals.
      re = self._real_step(g.real, self.m.real, self.v.real, self.v_max.real)
      im = self._real_step(g.imag, self.m.imag, self.v.imag, self.v_max.imag)
      self.t += 1
      self.m = re[1] + 1j * im[1]
      self.v = re[2] + 1j * im[2]
      self.v_max = re[3] + 1j * im[3]
      return re[0] + 1j * im[0]
    u, self.m, self.v, self.v_max = self._real_step(g, self.m, self.v, self.v_max)
    self.t += 1
    return u

  def _real_step(self, g, m, v, v_max):
    t = self.t + 1
    b1 = self.b1(self.t) if callable(self.b1) else self.b1
    b2 = self.b2
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (np.abs(g) ** 2)
    if self.convention == "pytorch":
      bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
      v_max = np.maximum(v_max, v)
      u = (m / bc1) / (np.sqrt(v_max / bc2 + self.eps_root) + self.eps)
    elif self.convention == "keras":
      bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
      v_max = np.maximum(v_max, v)
      u = (m / bc1) * np.sqrt(bc2) / (np.sqrt(v_max + self.eps_root) + self.eps)
    elif self.convention == "optax":
      bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
      v_max = np.maximum(v_max, v / bc2)
      u = (m / bc1) / (np.sqrt(v_max + self.eps_root) + self.eps)
    elif self.convention == "paper":
      v_max = np.maximum(v_max, v)
      u = m / (np.sqrt(v_max + self.eps_root) + self.eps)
    else:
      raise ValueError(self.convention)
    return u, m, v, v_max


def run_reference(
    grads: list[dict[str, np.ndarray]],
    params: dict[str, np.ndarray],
    *,
    learning_rate: float | Callable[[int], float],
    weight_decay: float = 0.0,
    coupled_weight_decay: float = 0.0,
    **options,
) -> list[dict[str, np.ndarray]]:
  """Runs AMSGrad over a gradient sequence; returns params after each step.

  ``grads[k]`` is the gradient at step k, fixed in advance (it does not depend
  on the params), so trajectories of different implementations can be
  compared step by step. ``coupled_weight_decay`` adds ``wd * params`` to the
  gradient (PyTorch ``Adam(weight_decay=wd)``); ``weight_decay`` is decoupled
  (PyTorch ``AdamW``).
  """
  params = {k: np.array(v) for k, v in params.items()}
  optimizers = {
      k: ReferenceAmsgrad(v.shape, complex_params=np.iscomplexobj(v), **options)
      for k, v in params.items()
  }
  trajectory = []
  for step, g in enumerate(grads):
    lr = learning_rate(step) if callable(learning_rate) else learning_rate
    for k, opt in optimizers.items():
      grad = g[k] + coupled_weight_decay * params[k]
      u = opt.step(grad)
      params[k] = params[k] * (1.0 - lr * weight_decay) - lr * u
    trajectory.append({k: v.copy() for k, v in params.items()})
  return trajectory
