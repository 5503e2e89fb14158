"""AMSGrad for JAX and Optax, following PyTorch, Keras, Optax or the paper."""

from optax_amsgrad._alias import amsgrad, amsgradw
from optax_amsgrad._decode import decode_state
from optax_amsgrad._flat import (
    FlatState,
    flatten_by_dtype,
    ravel_by_dtype,
    unravel_by_dtype,
)
from optax_amsgrad._step import apply_step
from optax_amsgrad._transform import (
    Convention,
    Implementation,
    ScaleByAmsgradState,
    StateRounding,
    scale_by_amsgrad,
)
from optax_amsgrad.cpu import available as cpu_kernel_available
from optax_amsgrad.interop import from_keras, from_optax, from_torch, to_keras, to_optax, to_torch

__version__ = "0.1.0"

__all__ = [
    "Convention",
    "FlatState",
    "Implementation",
    "ScaleByAmsgradState",
    "StateRounding",
    "__version__",
    "amsgrad",
    "amsgradw",
    "apply_step",
    "cpu_kernel_available",
    "decode_state",
    "flatten_by_dtype",
    "from_keras",
    "from_optax",
    "from_torch",
    "ravel_by_dtype",
    "scale_by_amsgrad",
    "to_keras",
    "to_optax",
    "to_torch",
    "unravel_by_dtype",
]
