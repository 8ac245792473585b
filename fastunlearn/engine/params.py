"""What trains: every weight, LoRA adapters, or FILA adapters (and activation checkpointing)."""

from __future__ import annotations

from torch import nn

from fastunlearn.data.text import SequenceSet
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.evaluation import seeded_sample
from fastunlearn.engine.inputs import batch
from fastunlearn.lora.fila import fila_init
from fastunlearn.lora.layer import inject_lora


def setup_params(model: nn.Module, cfg: UnlearnConfig, forget: SequenceSet, retain, saved: dict | None) -> None:
    """Make the trained parameters trainable (and only those). FILA's Fisher information: of the whole forget
    set, and of ``fisher_sample(retain, cfg)``. On resume (``saved``), FILA adapters are rebuilt from their
    saved initial factors instead of recomputing the Fisher information."""
    if cfg.params == "full":
        model.requires_grad_(True)
        return
    fila = cfg.fila_config()
    if cfg.params == "fila" and saved is None:
        fila_init(model, batch(forget), batch(fisher_sample(retain, cfg)), cfg.targets, fila)
        return
    layers = inject_lora(model, cfg.targets, cfg.rank, cfg.alpha, dropout=fila.dropout, use_rslora=fila.use_rslora)
    if cfg.params == "fila":
        for name, layer in layers.items():  # base weight := W0 - scale B0 A0, exactly as fila_init left it
            layer.init_from_factors(saved[f"buffer.{name}.lora_a0"], saved[f"buffer.{name}.lora_b0"])


def fisher_sample(retain: SequenceSet, cfg: UnlearnConfig) -> SequenceSet:
    """The retain sequences of FILA's retain Fisher: a seeded sample of ``cfg.fisher_max_examples`` (each
    Fisher is a mean over its examples, so the sample estimates the same quantity). The forget set is used
    whole: it is what the adapters must unlearn, and small."""
    return seeded_sample(retain, cfg.fisher_max_examples, cfg.seed)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of a transformers model (non-reentrant: frozen inputs are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing needs a transformers model, got {type(model).__name__}")
