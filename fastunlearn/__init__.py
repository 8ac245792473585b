"""fastunlearn: kernel-optimized LLM unlearning (Inverted Hinge Loss, FILA; Cha et al., arXiv 2408.06621).

Importing never initializes CUDA and never needs Triton or the compiled extension: each fast path is
probed on first use (see ``fastunlearn._dispatch``).
"""

from ._dispatch import has_csrc, has_triton, select_impl
from .fused_linear import FusedLinearIHL, fused_linear_ihl
from .ihl import IHLLoss, ihl_loss
from .objectives import (
    UnlearningLoss,
    UnlearningLossOutput,
    causal_lm_ihl_loss,
    ga_loss,
    retain_loss,
    shift_causal,
    unlearning_loss,
)

__version__ = "0.1.0"

__all__ = [
    "FusedLinearIHL",
    "IHLLoss",
    "UnlearningLoss",
    "UnlearningLossOutput",
    "causal_lm_ihl_loss",
    "fused_linear_ihl",
    "ga_loss",
    "has_csrc",
    "has_triton",
    "ihl_loss",
    "retain_loss",
    "select_impl",
    "shift_causal",
    "unlearning_loss",
]
