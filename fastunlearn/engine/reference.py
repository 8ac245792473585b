"""NPO's reference without a reference model: pi_ref's sequence log-likelihood of every forget sequence,
computed once before the first update and kept as a (N,) float32 tensor per forget set.

The value is a constant of the run: log pi_ref(y|x) of the model as given (after its dtype cast), which is
what the trained model starts from. The recipe computes it BEFORE the trained parameters are set up: FILA
replaces each adapted base weight W by W - scale B0 A0, so "the model with adapters disabled" there is W only up
to rounding, while the model as given is W exactly. No second model is held; the tensors go into every
checkpoint (``reference.<task>``), so a resume reads them instead of recomputing them.

:func:`sequence_logprobs` is also the helper for the Hugging Face trainer (``ForgetRetainDataset(...,
reference=...)``): it disables any LoRA adapters while it runs (:func:`fastunlearn.lora.adapters_disabled`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastunlearn.data.text import SequenceSet, iterate_batches
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.evals.metrics.common import inference
from fastunlearn.fused_lm import fused_causal_lm_logprob
from fastunlearn.lora.layer import adapters_disabled
from fastunlearn.losses import token_logprobs

PREFIX = "reference."  # checkpoint tensor names: reference.<task index>


def sequence_logprobs(model: nn.Module, seqs: SequenceSet, batch_size: int = 32, *, fused: bool = False) -> Tensor:
    """(N,) float32 on the CPU: log pi(y|x) of each sequence of ``seqs``, the sum of log p(next token) over its
    next-token targets (padding excluded; only the labelled ones, the answer, when ``seqs`` has labels), by
    ``model`` in eval mode with its LoRA adapters disabled, without gradients. ``fused``: from the last hidden
    states (:func:`fastunlearn.fused_lm.fused_causal_lm_logprob`), as a fused NPO run computes log pi_theta."""
    values = []
    with inference(model) as device, adapters_disabled(model):
        for batch in iterate_batches(seqs, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            if fused:
                token_logp = fused_causal_lm_logprob(model, batch["input_ids"], batch["attention_mask"],
                                                     labels=batch.get("labels"))  # fmt: skip
            else:
                token_logp = token_logprobs(model, batch)[0]
            values.append(token_logp.sum(-1).cpu())  # (B, T - 1) -> (B,): ignored targets hold exactly 0
    return torch.cat(values)


def forget_reference(model: nn.Module, tasks: list[SequenceSet], cfg: UnlearnConfig, saved: dict | None):
    """Per forget set, its reference log-likelihoods (N_k,), or None when the forget loss needs none (only NPO
    does). From the checkpoint when resuming (``saved``), else computed on ``model`` as it is now."""
    if cfg.forget_loss != "npo":
        return None
    if saved is not None:
        missing = [k for k in range(len(tasks)) if f"{PREFIX}{k}" not in saved]
        if missing:
            raise ValueError(f"the checkpoint has no NPO reference log-likelihoods for forget set(s) {missing}")
        return [saved[f"{PREFIX}{k}"] for k in range(len(tasks))]
    return [sequence_logprobs(model, seqs, cfg.eval_batch_size, fused=cfg.fused_ihl) for seqs in tasks]


def reference_tensors(reference: list[Tensor] | None) -> dict[str, Tensor]:
    """The checkpoint tensors of ``forget_reference``'s result (none without a reference)."""
    return {} if reference is None else {f"{PREFIX}{k}": t.contiguous() for k, t in enumerate(reference)}
