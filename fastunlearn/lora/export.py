"""Export a model with ``LoRALinear`` layers: a PEFT LoRA adapter, or a plain merged transformers model.

``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, out_dir)`` loads on the *unmodified* base model. After a
factor-based init (PiSSA, FILA) the base weight was changed to ``W0 - scale B0 A0``, so the adapter is
converted the way PEFT converts PiSSA: relative to W0 the update is ``scale (B A - B0 A0)``, i.e. the
rank-2r adapter ``A' = [A; A0]``, ``B' = [B, -B0]`` with alpha doubled (rsLoRA: times sqrt(2)) so the
scale is unchanged. Layers without initial factors get zero blocks. Factors are saved in float32.

``save_merged_model`` writes the full model with the adapters folded into the weights, under the original
parameter names, loadable with ``AutoModelForCausalLM.from_pretrained``; the live model is not changed.

Both write into a temporary directory next to ``out_dir`` and rename it into place: ``out_dir`` never
holds a partial export. An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``. The files
get the modes a plain ``open`` gives (0644 under umask 022): safetensors writes through a private 0600 file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fastunlearn.lora.layer import LoRALinear, lora_layers
from fastunlearn.utils.atomic import atomic_directory


def _respect_umask(directory: Path) -> None:
    """chmod every file in ``directory`` to 0666 minus the process umask, as ``open(path, "w")`` would create it.
    (Reading the umask sets it for an instant: ``os.umask`` is the only portable way to read it.)"""
    umask = os.umask(0o077)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _uniform(layers: dict[str, LoRALinear], attr: str):
    values = {getattr(layer, attr) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"the LoRA layers have different {attr} values {sorted(values)}: one PEFT config needs one")
    return values.pop()


def _peft_factors(layer: LoRALinear, with_initial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r', in), B (out, r')) in float32, relative to the original weight."""
    a, b = layer.lora_a.detach().float(), layer.lora_b.detach().float()
    if not with_initial:
        return a.contiguous(), b.contiguous()
    a0 = torch.zeros_like(a) if layer.lora_a0 is None else layer.lora_a0.float()
    b0 = torch.zeros_like(b) if layer.lora_b0 is None else layer.lora_b0.float()
    return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)  # (2r, in), (out, 2r)


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA adapter for the unmodified base model; returns out_dir.

    ``base_model_name_or_path`` defaults to ``model.config.name_or_path`` (as PEFT does). ``target_modules``
    lists the adapted modules' full names, so PEFT adapts exactly those.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call inject_lora first")
    rank, alpha, use_rslora = (_uniform(layers, attr) for attr in ("rank", "alpha", "use_rslora"))
    with_initial = any(layer.lora_a0 is not None for layer in layers.values())
    if with_initial:
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if use_rslora else 2)
    tensors = {}
    for name, layer in layers.items():
        a, b = _peft_factors(layer, with_initial)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": _uniform(layers, "dropout_p"),
        "use_rslora": use_rslora,
        "use_dora": False,
        "target_modules": list(layers),
        "fan_in_fan_out": any(layer.is_conv1d for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_directory(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _respect_umask(tmp)
    return Path(out_dir)


@contextlib.contextmanager
def _unwrapped(model: nn.Module, layers: dict[str, LoRALinear]) -> Iterator[None]:
    """Put each LoRALinear's base layer back in its place for the block, then the LoRALinear again."""
    try:
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
        yield
    finally:
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the original parameter names (no adapter keys), the trained adapters folded
    into their layers' weights (new tensors; every other entry is the live tensor, detached). The live model is
    not changed; raises (naming the layer) if a merged weight is not finite."""
    layers = lora_layers(model)
    merged = {f"{name}.weight": layer.merged_weight() for name, layer in layers.items()}  # raises on NaN first
    with _unwrapped(model, layers):
        state = model.state_dict()
    state.update(merged)
    return state


def save_merged_model(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``model`` (a transformers PreTrainedModel) with merged weights via ``save_pretrained``; returns out_dir.

    The merged weights are new tensors passed as the saved state dict: the live weights are never touched,
    and the adapter layers are back in place afterwards even if saving fails. The trained adapters are
    merged whatever the layers' ``disabled`` switch.
    """
    layers = lora_layers(model)
    merged = {f"{name}.weight": layer.merged_weight() for name, layer in layers.items()}  # raises on NaN first
    with atomic_directory(out_dir, overwrite) as tmp, _unwrapped(model, layers):
        state = model.state_dict()
        state.update(merged)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        _respect_umask(tmp)
    return Path(out_dir)
