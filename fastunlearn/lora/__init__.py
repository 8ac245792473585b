"""LoRA adapters and what builds and exports them: the layer and its injection (``layer``), which layers they act
on (``targets``), the empirical Fisher of those layers (``fisher``), FILA's initialization (``fila``) and the PEFT
or merged export (``export``). The layer's names are importable from here."""

from fastunlearn.lora.layer import LoRALinear, adapters_disabled, inject_lora, lora_layers, trainable_parameters

__all__ = ["LoRALinear", "adapters_disabled", "inject_lora", "lora_layers", "trainable_parameters"]
