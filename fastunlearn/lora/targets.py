"""Which layers of a model the adapters and the Fisher information act on.

A target pattern matches a module whose qualified name equals it or ends with ``"." + pattern`` (the rule
PEFT's ``target_modules`` uses), so ``"q_proj"`` matches every attention query projection and
``"mlp.c_proj"`` only the MLP's output projection. Only ``nn.Linear`` and GPT-2 style ``Conv1D`` layers
(``transformers.pytorch_utils.Conv1D``: weight stored transposed, (in, out)) qualify.

Presets (``targets="preset"`` picks one from ``model.config.model_type``): the paper's default "QV+FFN"
for GPT-Neo and GPT-2, all attention and MLP projections for Llama-family models and Phi.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "gpt_neo": ("q_proj", "v_proj", "c_fc", "c_proj"),  # QV + FFN
    "gpt2": ("c_attn", "mlp.c_fc", "mlp.c_proj"),  # c_attn holds Q, K and V
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
}
MODEL_TYPE_PRESETS = {
    "gpt_neo": "gpt_neo", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "phi": "phi",
}  # fmt: skip


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2's linear layer with a transposed (in, out) weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view for Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def resolve_patterns(model: nn.Module, targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target patterns from a preset name, ``"preset"`` (by model type), or a list of patterns."""
    if isinstance(targets, str):
        if targets == "preset":
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in MODEL_TYPE_PRESETS:
                raise ValueError(
                    f"targets='preset' needs a model type with a preset ({sorted(MODEL_TYPE_PRESETS)}), "
                    f"got {model_type!r}: pass target patterns instead"
                )
            return TARGET_PRESETS[MODEL_TYPE_PRESETS[model_type]]
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets]
        return (targets,)
    patterns = tuple(targets)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"targets must be a preset name or a non-empty list of name patterns, got {targets!r}")
    return patterns


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Module]:
    """Qualified name -> Linear/Conv1D module for every layer the patterns match (in model order)."""
    patterns = resolve_patterns(model, targets)
    found = {name: m for name, m in model.named_modules() if is_linear_like(m) and matches(name, patterns)}
    if not found:
        linear = [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear_like(m)]
        raise ValueError(
            f"targets {list(patterns)} match no nn.Linear or Conv1D layer of {type(model).__name__}; "
            f"its linear layers are named {sorted(set(linear))}"
        )
    owners = weight_owners(model)
    for name, module in found.items():
        others = [owner for owner in owners[id(module.weight)] if owner != name]
        if others:
            raise ValueError(
                f"target layer {name!r} shares its weight with {others[0]!r} (tied embeddings): an adapter, "
                f"FILA's weight update or its Fisher would act on both; leave {name!r} out of the targets"
            )
    return found


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> names of the modules holding it as their own ``weight`` (two or more: tied)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return owners
