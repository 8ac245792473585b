"""The checkpoint of a run: trainable tensors, AdamW state and random states in safetensors, the log in JSON.

No pickle. Rank 0 writes the full (gathered) state; every rank reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import _parallel
from .. import distributed as dist_utils
from .._atomic import atomic_directory, remove_stale_temporaries
from ..lora import lora_layers


def save_checkpoint(path: Path, model: nn.Module, optimizer, generator: torch.Generator, log: dict) -> None:
    """Rank 0 writes the full state (every rank must call: under FSDP the state is gathered)."""
    tensors = {f"param.{n}": t.contiguous() for n, t in _parallel.trainable_state(model).items()}
    for name, layer in lora_layers(model).items():
        if layer.lora_a0 is not None:
            tensors[f"buffer.{name}.lora_a0"] = layer.lora_a0.contiguous()
            tensors[f"buffer.{name}.lora_b0"] = layer.lora_b0.contiguous()
    if optimizer is not None:
        for index, state in _parallel.optimizer_state(model, optimizer).items():
            tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
    if not dist_utils.current().is_main:
        return
    tensors["rng.torch"], tensors["rng.data"] = torch.get_rng_state(), generator.get_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # this process's GPU only: touching the others would start a context on each
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"format": 1, "log": log}, indent=1))


def load_params_and_rng(model: nn.Module, saved: dict, generator: torch.Generator) -> None:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {k.removeprefix("param.") for k in saved if k.startswith("param.")}
    if names != set(trainable):
        raise ValueError(
            f"the checkpoint's trainable parameters differ from this model's: only in the checkpoint "
            f"{sorted(names - set(trainable))[:3]}, only in the model {sorted(set(trainable) - names)[:3]}"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[f"param.{name}"])
    torch.set_rng_state(saved["rng.torch"])
    generator.set_state(saved["rng.data"])
    device = next(model.parameters()).device
    if "rng.cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng.cuda"], device)


def load_optimizer(model: nn.Module, optimizer, saved: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in saved.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    _parallel.load_optimizer_state(model, optimizer, state)


def prepare_out_dir_on_all_ranks(out: Path, resume: bool, process) -> tuple[dict | None, dict | None]:
    """Rank 0 first (it removes stale temporaries), then the others read the same checkpoint; an error on
    rank 0 is raised on every rank. Resuming on several processes needs out_dir on a shared file system."""
    first: tuple | None = None
    error = None
    if process.is_main:
        try:
            first = _prepare_out_dir(out, resume)
        except (FileExistsError, OSError, ValueError) as exc:
            error = exc
    dist_utils.raise_together(error)
    return first if process.is_main else _prepare_out_dir(out, resume)


def _prepare_out_dir(out: Path, resume: bool) -> tuple[dict | None, dict | None]:
    """(saved tensors, saved log) of a checkpoint to resume, or (None, None) for a fresh run in an empty out_dir."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a directory")
    remove_stale_temporaries(out)  # left by a run killed while writing
    state = out / "checkpoint" / "state.json"
    if resume and state.is_file():
        return load_file(str(state.with_suffix(".safetensors"))), json.loads(state.read_text())["log"]
    if out.exists() and any(out.iterdir()):
        what = "a checkpoint (pass resume=True to continue it)" if state.is_file() else "no checkpoint to resume"
        raise FileExistsError(f"out_dir {str(out)!r} is not empty and holds {what}; remove it or choose another")
    return None, None
