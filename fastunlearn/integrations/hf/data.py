"""Forget / retain pairs for a Hugging Face ``Trainer``: the dataset, its collator, and the step's target counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastunlearn.data.labels import count_targets as count_next_token_targets
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine.reference import sequence_logprobs as reference_logprobs  # noqa: F401  (NPO: once, before training)
from fastunlearn.losses import count_sequences

FORGET_KEYS = ("forget_input_ids", "forget_attention_mask")
RETAIN_KEYS = ("retain_input_ids", "retain_attention_mask")
BATCH_KEYS = FORGET_KEYS + RETAIN_KEYS
REFERENCE_KEY = "forget_reference"  # NPO: the reference model's sequence log-likelihood of the forget row


def check_set(name: str, seqs: object) -> None:
    if not isinstance(seqs, SequenceSet):
        raise TypeError(f"{name} must be a fastunlearn.data.SequenceSet, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{name} is empty: it has no sequences")


class ForgetRetainDataset(Dataset):
    """Item i: forget row i and, with a retain set, retain row i mod len(retain) (1-D int64 tensors keyed by
    ``BATCH_KEYS``). Its length is the forget set's, so one epoch sees every forget sequence once.

    ``reference`` (len(forget),) float: for ``forget_loss="npo"``, the reference model's log-likelihood of each
    forget sequence, from :func:`fastunlearn.integrations.hf.reference_logprobs` (run once, before training,
    on the model to unlearn); item i then also holds ``forget_reference`` (a 0-dim float32 tensor)."""

    def __init__(self, forget: SequenceSet, retain: SequenceSet | None = None, reference: Tensor | None = None) -> None:
        check_set("forget", forget)
        if retain is not None:
            check_set("retain", retain)
        if reference is not None:
            if not isinstance(reference, Tensor) or not reference.dtype.is_floating_point:
                what = str(reference.dtype) if isinstance(reference, Tensor) else type(reference).__name__
                raise TypeError(f"reference must be a float tensor, got {what}")
            if tuple(reference.shape) != (len(forget),):
                raise ValueError(f"reference must have shape ({len(forget)},), one value per forget sequence, got "
                                 f"{tuple(reference.shape)}")  # fmt: skip
            if not bool(torch.isfinite(reference).all()):
                raise ValueError("reference has non-finite values (NaN or inf): recompute it with reference_logprobs")
            reference = reference.detach().float().cpu()
        self.forget, self.retain, self.reference = forget, retain, reference

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = range(len(self))[index]  # IndexError out of range; negative indices count from the end
        item = {
            "forget_input_ids": self.forget.input_ids[index],
            "forget_attention_mask": self.forget.attention_mask[index],
        }
        if self.reference is not None:
            item[REFERENCE_KEY] = self.reference[index]
        if self.retain is not None:
            paired = index % len(self.retain)
            item["retain_input_ids"] = self.retain.input_ids[paired]
            item["retain_attention_mask"] = self.retain.attention_mask[paired]
        return item


def collate_forget_retain(features: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items of :class:`ForgetRetainDataset` into a batch: each key (L,) -> (B, L)."""
    if not features:
        raise ValueError("features is empty: no items to collate")
    keys = list(features[0])
    for index, feature in enumerate(features):
        if list(feature) != keys:
            raise ValueError(f"feature {index} has keys {list(feature)}, feature 0 has {keys}")
    return {key: torch.stack([feature[key] for feature in features]) for key in keys}


def require_keys(inputs: Mapping[str, Tensor], keys: tuple[str, ...], why: str) -> tuple[Tensor, Tensor]:
    for key in keys:
        if key not in inputs:
            raise ValueError(f"the batch has no {key!r} ({why}); it has {sorted(inputs)}")
    return inputs[keys[0]], inputs[keys[1]]


def count_targets(batches: Sequence[Mapping[str, Tensor]], *, sequences: bool = False) -> Tensor:
    """(2,) int64: the forget and retain next-token targets of ``batches`` (the micro-batches of one optimizer
    step), on their device; the ``num_items_in_batch`` of :func:`unlearning_compute_loss`. No retain keys: 0.
    ``sequences``: count the forget sequences with at least one target instead (NPO, SimNPO: one term each)."""
    count_forget = count_sequences if sequences else count_next_token_targets
    if not batches:
        raise ValueError("batches is empty: no targets to count")
    counts = []
    for batch in batches:
        retain_mask = batch.get(RETAIN_KEYS[1])
        forget = count_forget(*require_keys(batch, FORGET_KEYS, "every batch needs its forget sequences"))
        if retain_mask is None:
            retain = forget.new_zeros(())
        else:
            retain = count_next_token_targets(
                *require_keys(batch, RETAIN_KEYS, "its retain mask needs retain sequences")
            )
        counts.append(torch.stack([forget, retain]))
    return torch.stack(counts).sum(0)  # (batches, 2) -> (2,)
