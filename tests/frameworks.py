"""Trajectories of the real frameworks' AMSGrad on a fixed gradient sequence.

Used by the live parity tests and by ``tests/data/record_golden.py``, which
stores the results so that the parity checks also run where PyTorch or Keras
are not installed.
"""

from __future__ import annotations

import numpy as np

Tree = dict[str, np.ndarray]


def torch_trajectory(
    grads: list[Tree],
    params: Tree,
    *,
    optimizer: str = "Adam",
    implementation: str = "single_tensor",
    **options,
) -> list[Tree]:
  """``torch.optim.Adam/AdamW(amsgrad=True, **options)`` in float64/complex128.

  ``implementation`` picks PyTorch's code path: ``"single_tensor"``
  (``foreach=False``), ``"foreach"`` or ``"fused"``.
  """
  import torch

  flags = {
      "single_tensor": {"foreach": False},
      "foreach": {"foreach": True},
      "fused": {"fused": True},
  }[implementation]
  tensors = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in params.items()}
  opt = getattr(torch.optim, optimizer)(
      list(tensors.values()), amsgrad=True, **flags, **options
  )
  trajectory = []
  for g in grads:
    for k, t in tensors.items():
      t.grad = torch.tensor(np.array(g[k]))
    opt.step()
    trajectory.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
  return trajectory


def keras_trajectory(
    grads: list[Tree], params: Tree, *, optimizer: str = "Adam", **options
) -> list[Tree]:
  """Keras 3 ``Adam/AdamW(amsgrad=True, **options)`` on float64 variables."""
  import keras

  variables = [keras.Variable(np.array(v), dtype="float64", name=k) for k, v in params.items()]
  opt = getattr(keras.optimizers, optimizer)(amsgrad=True, **options)
  opt.build(variables)
  trajectory = []
  for g in grads:
    opt.apply_gradients(
        [(keras.ops.convert_to_tensor(g[k], dtype="float64"), v)
         for k, v in zip(params, variables, strict=True)]
    )
    trajectory.append(
        {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in zip(params, variables, strict=True)}
    )
  return trajectory
