"""fastunlearn: kernel-optimized LLM unlearning (Inverted Hinge Loss, FILA; Cha et al., arXiv 2408.06621).

Importing never initializes CUDA and never needs Triton, the compiled extension or transformers: the fast paths
are probed once, without importing either (see ``fastunlearn._dispatch``); the engine loads on first use.
``__all__`` lists the public API in brief; the other names below stay importable from here for existing code,
and every name is importable from its module.
"""

import importlib

from .export import save_merged_model, save_peft_adapter
from .fila import FilaConfig, fila_init
from .fisher import empirical_fisher, relative_fisher
from .fused_linear import FusedLinearIHL, fused_linear_ihl
from .ihl import IHLLoss, ihl_loss
from .logprob import fused_linear_logprob, token_logprob
from .lora import LoRALinear, inject_lora
from .objectives import (
    UnlearningLoss,
    causal_lm_ihl_loss,
    ga_loss,
    npo_loss,
    retain_loss,
    shift_causal,
    simnpo_loss,
    unlearning_loss,
)

# Also importable from here (the README's API table uses these names), though not in the short __all__.
from ._dispatch import has_csrc as has_csrc, has_triton as has_triton, select_impl as select_impl  # isort: skip
from .lora import lora_layers as lora_layers, trainable_parameters as trainable_parameters  # isort: skip
from .lowrank import weighted_lowrank as weighted_lowrank  # isort: skip
from .lowrank import weighted_lowrank_grouped as weighted_lowrank_grouped  # isort: skip

__version__ = "0.1.0"

# The engine imports transformers (metrics, data); it loads on first use so `import fastunlearn` stays light.
_LAZY = {"unlearn": ".engine", "UnlearnConfig": ".engine", "UnlearnResult": ".engine",
         "finetune": ".engine.finetune", "FinetuneConfig": ".engine.finetune"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")


# The public API in brief; everything else is importable from its module (fastunlearn.metrics, .data, ...).
__all__ = [
    # losses
    "FusedLinearIHL",
    "IHLLoss",
    "UnlearningLoss",
    "causal_lm_ihl_loss",
    "fused_linear_ihl",
    "ga_loss",
    "ihl_loss",
    "npo_loss",
    "retain_loss",
    "shift_causal",
    "simnpo_loss",
    "unlearning_loss",
    # per-token log-likelihoods (NPO, SimNPO, evaluation)
    "fused_linear_logprob",
    "token_logprob",
    # LoRA and FILA
    "FilaConfig",
    "LoRALinear",
    "fila_init",
    "inject_lora",
    # Fisher
    "empirical_fisher",
    "relative_fisher",
    # export
    "save_merged_model",
    "save_peft_adapter",
    # the unlearning job (loaded on first use)
    "UnlearnConfig",
    "unlearn",
    # supervised fine-tuning (loaded on first use)
    "FinetuneConfig",
    "finetune",
]
