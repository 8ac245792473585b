"""The data an unlearning run is given: which sets it has, and a fingerprint that a resume must match."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from ..data import SequenceSet, UnlearningData
from ..objectives import count_targets
from .config import UnlearnConfig


def set_name(task: int, n_tasks: int) -> str:
    return "forget set" if n_tasks == 1 else f"forget set {task + 1} of {n_tasks}"


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    """Next-token targets of a batch (``objectives.next_token_targets``), counted where the batch lives."""
    return int(count_targets(batch["input_ids"], batch["attention_mask"]))


def check_data(data, cfg: UnlearnConfig) -> tuple[list[SequenceSet], SequenceSet | None, SequenceSet | None]:
    """(forget sets, retain set, held-out set); ValueError / TypeError naming the set and what it lacks."""
    if isinstance(data, UnlearningData):
        forget, retain, heldout = data.forget, data.retain, data.heldout
        tasks = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    elif isinstance(data, (list, tuple)):
        tasks, retain, heldout = list(data), None, None
    else:
        raise TypeError(f"data must be an UnlearningData or a list of forget SequenceSets, got {type(data).__name__}")
    if not tasks:
        raise ValueError("data has no forget set: nothing to unlearn")
    sets = [(set_name(i, len(tasks)), seqs, True) for i, seqs in enumerate(tasks)]
    sets += [("retain set", retain, False), ("held-out set", heldout, True)]
    for name, seqs, scored in sets:  # scored: MA and EL are measured on it
        if seqs is None:
            continue
        if not isinstance(seqs, SequenceSet):
            raise TypeError(f"{name} must be a SequenceSet, got {type(seqs).__name__}")
        if len(seqs) == 0 or n_targets(batch(seqs)) == 0:
            raise ValueError(f"{name} is empty: it has {len(seqs)} sequences and no next-token target")
        if scored:
            seqs.check_el_length(name, cfg.el_n)
    if retain is None:
        for needs, why in (
            (cfg.retain_weight > 0, f"retain_weight={cfg.retain_weight} (set retain_weight=0 for no retain loss)"),
            (cfg.params == "fila", "params='fila' (FILA weighs forget against retain Fisher information)"),
            (cfg.eval_retain_ppl, "eval_retain_ppl=True"),
        ):
            if needs:
                raise ValueError(f"{why} needs a retain set, and data has none")
    if cfg.stop == "heldout" and heldout is None:
        raise ValueError("stop='heldout' needs a held-out set, and data has none (or use stop='threshold')")
    return tasks, retain, heldout


def batch(seqs: SequenceSet) -> dict[str, torch.Tensor]:
    return {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask}


def fingerprint(sets: Sequence[SequenceSet | None]) -> str:
    digest = hashlib.sha256()
    for seqs in sets:
        for t in (None,) if seqs is None else (seqs.input_ids, seqs.attention_mask):
            digest.update(b"none" if t is None else repr(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
    return digest.hexdigest()


FINGERPRINT_FULL_BYTES = 256 * 2**20  # models up to this size hash every weight; larger ones a fixed sample
FINGERPRINT_SAMPLE = 4096  # elements hashed per tensor of a larger model (evenly spaced, deterministic)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config and its weights as given (before any adapter), so a resume or a cached
    baseline can tell another model from this one.

    Every parameter and buffer name, shape and dtype is hashed; their values in full up to
    ``FINGERPRINT_FULL_BYTES`` of weights, else ``FINGERPRINT_SAMPLE`` evenly spaced elements of each tensor
    (a deterministic sample: a changed fine-tune shows in it; one flipped weight may not).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    digest.update(type(model).__name__.encode())
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    full = sum(t.numel() * t.element_size() for t in tensors.values()) <= FINGERPRINT_FULL_BYTES
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        if not full and flat.numel() > FINGERPRINT_SAMPLE:
            step = flat.numel() // FINGERPRINT_SAMPLE
            flat = flat[:: max(step, 1)][:FINGERPRINT_SAMPLE]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
