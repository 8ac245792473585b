"""fastunlearn: kernel-optimized LLM unlearning (Inverted Hinge Loss, FILA; Cha et al., arXiv 2408.06621).

Importing never initializes CUDA and never needs Triton, the compiled extension or transformers: the fast paths
are probed once, without importing either (see ``fastunlearn.ops.dispatch``); the engine loads on first use.
``__all__`` lists the public API in brief; the other names below stay importable from here for existing code,
and every name is importable from its module.
"""

import importlib

from fastunlearn.lora.export import save_merged_model, save_peft_adapter
from fastunlearn.lora.fila import FilaConfig, fila_init
from fastunlearn.lora.fisher import empirical_fisher, relative_fisher
from fastunlearn.lora.layer import LoRALinear, inject_lora
from fastunlearn.losses import (
    UnlearningLoss,
    causal_lm_ihl_loss,
    ga_loss,
    npo_loss,
    retain_loss,
    shift_causal,
    simnpo_loss,
    unlearning_loss,
)
from fastunlearn.ops.fused_linear import FusedLinearIHL, fused_linear_ihl
from fastunlearn.ops.ihl import IHLLoss, ihl_loss
from fastunlearn.ops.logprob import fused_linear_logprob, token_logprob
from fastunlearn.utils import moved

# Also importable from here (the README's API table uses these names), though not in the short __all__.
from fastunlearn.ops.dispatch import has_csrc as has_csrc, has_triton as has_triton  # isort: skip
from fastunlearn.ops.dispatch import select_impl as select_impl  # isort: skip
from fastunlearn.lora.layer import lora_layers as lora_layers  # isort: skip
from fastunlearn.lora.layer import trainable_parameters as trainable_parameters  # isort: skip
from fastunlearn.ops.lowrank import weighted_lowrank as weighted_lowrank  # isort: skip
from fastunlearn.ops.lowrank import weighted_lowrank_grouped as weighted_lowrank_grouped  # isort: skip

moved.install()  # old import paths (fastunlearn.metrics, fastunlearn.objectives, ...) keep working

__version__ = "0.1.0"

# The engine and the audit import transformers (metrics, data); they load on first use so `import fastunlearn`
# stays light.
_LAZY = {"unlearn": ".engine", "UnlearnConfig": ".engine", "UnlearnResult": ".engine",
         "finetune": ".engine.finetune", "FinetuneConfig": ".engine.finetune",
         "audit": ".evals.audit", "AuditConfig": ".evals.audit", "AuditResult": ".evals.audit"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")


# The public API in brief; everything else is importable from its module (fastunlearn.evals.metrics, .data, ...).
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
    # does the forgetting hold: quantization, relearning, membership (loaded on first use)
    "AuditConfig",
    "audit",
]
