"""AMSGrad for JAX and Optax, following PyTorch, Keras, Optax or the paper."""

from optax_amsgrad._alias import amsgrad, amsgradw
from optax_amsgrad._transform import (
    Convention,
    ScaleByAmsgradState,
    StateRounding,
    scale_by_amsgrad,
)

__version__ = "0.1.0"

__all__ = [
    "Convention",
    "ScaleByAmsgradState",
    "StateRounding",
    "__version__",
    "amsgrad",
    "amsgradw",
    "scale_by_amsgrad",
]
