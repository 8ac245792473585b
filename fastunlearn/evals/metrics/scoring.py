"""Every next-token number of a sequence from one teacher-forced forward per batch: the summed NLL, the number of
scored tokens and the greedy hits, of which perplexity and MA are made (see ``fastunlearn.evals.metrics``).

Two paths give the same numbers:

- **fused** (default where it applies): the model's backbone to its last hidden states, then log p(target) and the
  argmax of each position in one pass over each chunk of the output layer's logits
  (:func:`fastunlearn.fused_lm.fused_causal_lm_logprob_argmax`); the (B, T, V) logits never exist.
- **logits**: ``model(...).logits``, their argmax and float32 cross-entropy. The reference the fused path is
  tested against, and the path for what the fused one cannot reproduce: models that
  :func:`fastunlearn.fused_lm.check_fused_ihl_support` refuses (an output layer that is not a plain ``nn.Linear``,
  logits transformed after it such as Gemma 2's softcapping, no backbone separate from the model), float64
  models, and models wrapped for several processes (DDP; FSDP, whose sharded parameters only its own forward
  gathers).

The greedy token is the first index of the maximum logit on both paths (``torch.argmax``'s rule), from the same
logits up to GEMM rounding: hits agree except where two logits tie within that rounding. NLL sums agree to float32
rounding (about 1e-7 relative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.data.labels import next_token_targets
from fastunlearn.evals.metrics.common import check_batch, inference, progress
from fastunlearn.fused_lm import check_fused_ihl_support, fused_causal_lm_logprob_argmax
from fastunlearn.utils.validate import check_int

IGNORE = -100


class SequenceScores(NamedTuple):
    """Per sequence (N,): ``nll`` the summed next-token NLL (float64), ``tokens`` the scored next tokens (int64),
    ``correct`` those whose greedy prediction is the target (int64)."""

    nll: Tensor
    tokens: Tensor
    correct: Tensor

    def ma(self) -> Tensor:
        """Memorization accuracy of each sequence (N,) float64 (NaN where no token is scored)."""
        return self.correct.double() / self.tokens

    def perplexity(self) -> float:
        """exp(total NLL / total scored tokens) over the sequences."""
        return math.exp(self.nll.sum().item() / self.tokens.sum().item())


def fused_unsupported(model: nn.Module) -> str | None:
    """Why the fused path cannot score ``model`` (a sentence), or None when it can."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, (FSDPModule, FullyShardedDataParallel, DistributedDataParallel)):
            return f"the model is wrapped for several processes ({type(model).__name__})"
    try:
        check_fused_ihl_support(model)
    except ValueError as exc:
        return str(exc)
    weight = model.get_output_embeddings().weight
    if type(weight) not in (torch.Tensor, nn.Parameter):  # e.g. a sharded DTensor
        return f"the output layer's weight is a {type(weight).__name__}, not a plain tensor"
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the output layer's weight is {weight.dtype} (the fused op takes float32, bfloat16 or float16)"
    return None


def use_fused(model: nn.Module, fused: bool | None) -> bool:
    """``fused``: True (raise ValueError naming the reason if the fused path cannot score ``model``), False (the
    logits path), None (fused where it applies)."""
    if fused is False:
        return False
    if fused not in (None, True):
        raise ValueError(f"fused must be True, False or None, got {fused!r}")
    reason = fused_unsupported(model)
    if reason is not None and fused:
        raise ValueError(f"fused=True but the fused scoring path cannot reproduce this model's logits: {reason}")
    return reason is None


def score_batch(
    model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None, *, fused: bool,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(summed NLL (B,) float64, greedy hits (B,) int64) of one batch on the model's device, inside
    ``inference(model)``. labels (B, T) aligned with input_ids, -100 where nothing is scored (padding included);
    attention_mask (B, T) or None goes to the model, with position ids that skip left padding."""
    mask = None if attention_mask is None else attention_mask.long()
    position = {} if mask is None else {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    targets = labels[:, 1:]  # (B, T-1)
    if fused:
        logp, greedy = fused_causal_lm_logprob_argmax(
            model, input_ids, mask, labels=labels, ignore_index=IGNORE, chunk_rows=chunk_rows, **position
        )
        nll = -logp.double().sum(1)
    else:
        kwargs = {} if mask is None else {"attention_mask": mask, **position}
        logits = model(input_ids=input_ids, **kwargs).logits[:, :-1]  # (B, T-1, V)
        greedy = logits.argmax(-1)
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        del logits
        nll = token_nll.double().sum(1)
    return nll.cpu(), ((greedy == targets) & (targets != IGNORE)).sum(1).cpu()


class Targets(NamedTuple):
    """A set checked and ready to score: ``ids`` (N, T) int64, ``mask`` (N, T) bool or None (what the model sees),
    ``targets`` (N, T - 1) int64: the next token scored at each position, -100 where none is."""

    ids: Tensor
    mask: Tensor | None
    targets: Tensor


def next_targets(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
) -> Targets:
    """Check a set (on the CPU, before any forward) and find what :func:`score_sequences` scores in it."""
    ids = check_batch(model, input_ids, 2)
    mask = None if attention_mask is None else attention_mask.cpu().bool()
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    if labels is not None:
        labels = labels.cpu().long()
        if labels.shape != ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(ids.shape)}")
        labels = labels.masked_fill(labels < 0, IGNORE)  # any negative label is ignored
    return Targets(ids, mask, next_token_targets(ids, mask, labels, ignore_index=IGNORE))  # the one rule


def score_sequences(
    model: nn.Module,
    input_ids: Tensor | Targets,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    batch_size: int = 32,
    fused: bool | None = None,
    chunk_rows: int | None = None,
    desc: str = "scoring",
) -> SequenceScores:
    """(summed NLL, scored tokens, greedy hits) of each sequence of ``input_ids`` (N, T), one teacher-forced
    forward per ``batch_size`` sequences (the module docstring: the fused and the logits paths).

    A next token x_t is scored where neither x_t nor x_{t-1} is padding (``attention_mask``, on either side: the
    model sees the mask and position ids that skip it); ``labels`` (N, T) aligned with input_ids (Hugging Face
    style) or None: only positions with a label >= 0 count, against that label (a question/answer set's answers).
    ``input_ids`` may also be what :func:`next_targets` returned (then without mask and labels).
    ``fused``: None (fused where it applies), True (required), False (through the logits). ``chunk_rows``: rows
    of logits per chunk on the fused path (default: about 256 MiB of float32). MA = correct / tokens,
    perplexity = exp(sum nll / sum tokens)."""
    if isinstance(input_ids, Targets):
        if attention_mask is not None or labels is not None:
            raise ValueError("pass attention_mask and labels to next_targets, not with its result")
        ids, mask, targets = input_ids
    else:
        ids, mask, targets = next_targets(model, input_ids, attention_mask, labels)
    check_int("batch_size", batch_size, 1)
    fused = use_fused(model, fused)
    full = torch.cat([torch.full((len(ids), 1), IGNORE), targets], dim=1)  # (N, T): targets as HF-style labels
    nll, correct = [], []
    batches = range(0, len(ids), batch_size)
    with inference(model) as device:
        for lo in progress(batches, desc, total=len(batches)):
            rows = slice(lo, lo + batch_size)
            m = None if mask is None else mask[rows].to(device)
            batch_nll, batch_correct = score_batch(
                model, ids[rows].to(device), full[rows].to(device), m, fused=fused, chunk_rows=chunk_rows
            )
            nll.append(batch_nll)
            correct.append(batch_correct)
    return SequenceScores(torch.cat(nll), (targets != IGNORE).sum(1), torch.cat(correct))
