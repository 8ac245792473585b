"""fastunlearn: kernel-optimized LLM unlearning (Inverted Hinge Loss, FILA; Cha et al., arXiv 2408.06621).

Importing never initializes CUDA and never needs Triton or the compiled extension: the fast paths are
probed once, without importing either (see ``fastunlearn._dispatch``); the engine loads on first use.
"""

import importlib

from ._dispatch import has_csrc, has_triton, select_impl
from .export import save_merged_model, save_peft_adapter
from .fila import FilaConfig, FilaResult, fila_init
from .fisher import FisherResult, empirical_fisher, relative_fisher
from .fused_linear import FusedLinearIHL, fused_linear_ihl
from .ihl import IHLLoss, ihl_loss
from .lora import LoRALinear, inject_lora, lora_layers, trainable_parameters
from .lowrank import LowRank, weighted_lowrank, weighted_lowrank_grouped
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

# The engine imports transformers (metrics, data); it loads on first use so `import fastunlearn` stays light.
_LAZY = {"unlearn": ".engine", "UnlearnConfig": ".engine", "UnlearnResult": ".engine"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")


__all__ = [
    "FilaConfig",
    "FilaResult",
    "FisherResult",
    "FusedLinearIHL",
    "IHLLoss",
    "LoRALinear",
    "LowRank",
    "UnlearnConfig",
    "UnlearnResult",
    "UnlearningLoss",
    "UnlearningLossOutput",
    "causal_lm_ihl_loss",
    "empirical_fisher",
    "fila_init",
    "fused_linear_ihl",
    "ga_loss",
    "has_csrc",
    "has_triton",
    "ihl_loss",
    "inject_lora",
    "lora_layers",
    "relative_fisher",
    "retain_loss",
    "save_merged_model",
    "save_peft_adapter",
    "select_impl",
    "shift_causal",
    "trainable_parameters",
    "unlearn",
    "unlearning_loss",
    "weighted_lowrank",
    "weighted_lowrank_grouped",
]
