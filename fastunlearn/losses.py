"""The unlearning objectives built from the loss terms: IHL, gradient ascent (GA), NPO, SimNPO and the retain loss.

- ``retain_loss``: next-token cross-entropy (the "descent" part of GD), mean over non-ignored tokens.
- ``ga_loss``: its negation on the forget set (gradient ascent); unbounded below.
- ``unlearning_loss``: forget term (``"ihl"`` or ``"ga"``) + ``retain_weight`` x retain loss. The paper's
  objective is IHL + retain loss; GD is GA + retain loss; ``retain_weight=0`` (or no retain batch) gives
  the forget term alone.
- ``shift_causal``: aligns a causal LM's logits (B, T, V) with its next tokens, masking padding.
- ``npo_loss`` / ``simnpo_loss``: per-sequence losses on sequence log-likelihoods (``sequence_logprob``).
- ``forget_term``: the engine's forget term of any ``FORGET_LOSSES`` entry, from logits or (fused) hidden states.

Token losses (IHL, GA) are sums over next-token targets, normalized by a token count; sequence losses (NPO,
SimNPO) are sums over sequences with at least one target, normalized by a sequence count
(:func:`forget_units` counts either).

Every reduction over tokens divides by the non-ignored count on the device, so an all-ignored batch
gives 0 and zero gradients, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.data.labels import count_targets, next_token_targets
from fastunlearn.ops.ihl import count_valid, flatten_labels, ihl_loss, reduce_rows
from fastunlearn.ops.logprob import token_logprob
from fastunlearn.utils import validate

TOKEN_LOSSES = ("ihl", "ga")  # one term per next-token target
SEQUENCE_LOSSES = ("npo", "simnpo")  # one term per sequence
FORGET_LOSSES = TOKEN_LOSSES + SEQUENCE_LOSSES
FUSED_LOSSES = FORGET_LOSSES  # forget terms with a fused path (no (B, T, V) logits): all of them
NPO_BETA = 0.1  # Zhang et al. 2024 (and open-unlearning's configs/trainer/NPO.yaml)
SIMNPO_BETA, SIMNPO_GAMMA = 4.5, 0.0  # open-unlearning's configs/trainer/SimNPO.yaml (beta 4.5, delta 0)


def shift_causal(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """(logits[..., :-1, :], :func:`next_token_targets`): a causal LM's outputs aligned with what they predict.

    The logits are a view: no copy.
    """
    validate.check_float_tensor("logits", logits, min_dim=2, float64=True)
    if input_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)} but logits (..., T, V) needs {tuple(logits.shape[:-1])}"
        )
    return logits[..., :-1, :], next_token_targets(input_ids, attention_mask, labels, ignore_index)


def causal_lm_ihl_loss(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
) -> Tensor:
    """IHL of a causal LM's output (B, T, V) on its own next tokens (one-token shift, padding masked)."""
    shifted, targets = shift_causal(logits, input_ids, attention_mask, labels, ignore_index)
    return ihl_loss(shifted, targets, ignore_index=ignore_index, reduction=reduction, margin=margin)


def retain_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (float32 result, float64 for float64 logits); ``mean`` over non-ignored tokens,
    0 when there are none."""
    validate.check_float_tensor("logits", logits, float64=True)
    validate.check_labels(labels, logits.shape[:-1], logits.device, "logits (..., V)")
    validate.check_reduction_and_margin(reduction, 1.0)
    y = flatten_labels(labels)
    if validate.value_checks_enabled(logits.device):
        validate.check_label_values(y, logits.shape[-1], ignore_index)
    rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, ignore_index=ignore_index, reduction="none")
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 -> float32; float64 stays
    return reduce_rows(rows, count_valid(y, ignore_index), reduction, labels.shape)


def ga_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Gradient ascent on the forget set: the negated next-token cross-entropy."""
    return -retain_loss(logits, labels, ignore_index=ignore_index, reduction=reduction)


def check_forget_loss(forget_loss: object, choices: tuple[str, ...] = FORGET_LOSSES) -> None:
    """``forget_loss`` is one of ``choices``: a token loss, or (where ``choices`` has them) a sequence loss."""
    if forget_loss not in choices:
        raise ValueError(f"forget_loss must be one of {tuple(choices)}, got {forget_loss!r}")


def check_objective(
    forget_loss: object, retain_weight: object, margin: object = 1.0, beta: object = None, gamma: object = None,
    choices: tuple[str, ...] = FORGET_LOSSES,
) -> None:  # fmt: skip
    """The unlearning objective's options: ValueError naming the bad one and its value. ``beta`` (NPO, SimNPO)
    and ``gamma`` (SimNPO): None for the loss's default."""
    check_forget_loss(forget_loss, choices)
    validate.check_number("retain_weight", retain_weight, 0)
    validate.check_number("margin", margin, 0, strict=True)
    check_sequence_options(forget_loss, beta, gamma)


def check_sequence_options(forget_loss: str, beta: object, gamma: object) -> None:
    """``beta`` > 0 for NPO / SimNPO, ``gamma`` >= 0 for SimNPO; refused (named) with a loss that has no use
    for them."""
    if beta is not None:
        if forget_loss not in SEQUENCE_LOSSES:
            raise ValueError(f"beta is a parameter of {SEQUENCE_LOSSES}, not of forget_loss={forget_loss!r}")
        validate.check_number("beta", beta, 0, strict=True)
    if gamma is not None:
        if forget_loss != "simnpo":
            raise ValueError(f"gamma is a parameter of 'simnpo', not of forget_loss={forget_loss!r}")
        validate.check_number("gamma", gamma, 0)


def check_fused(forget_loss: str, fused: object) -> None:
    """A fused forget term exists for ``FUSED_LOSSES`` (computed from the last hidden states)."""
    if fused and forget_loss not in FUSED_LOSSES:
        raise ValueError(
            f"fused_ihl=True computes the forget term of {FUSED_LOSSES} from hidden states; "
            f"forget_loss={forget_loss!r} has no fused path"
        )


class UnlearningLossOutput(NamedTuple):
    total: Tensor  # what to backpropagate
    forget: Tensor  # forget term (IHL or negated CE), detached
    retain: Tensor  # retain CE, detached (0 when no retain batch)


def unlearning_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor | None = None,
    retain_labels: Tensor | None = None,
    *,
    forget_loss: str = "ihl",
    retain_weight: float = 1.0,
    ignore_index: int = -100,
    margin: float = 1.0,
) -> UnlearningLossOutput:
    """forget term + retain_weight x retain CE, on labels already aligned with the logits (token losses only:
    NPO and SimNPO need whole sequences, see :func:`npo_loss`, :func:`simnpo_loss`, :func:`forget_term`)."""
    check_objective(forget_loss, retain_weight, margin, choices=TOKEN_LOSSES)
    if (retain_logits is None) != (retain_labels is None):
        raise ValueError("retain_logits and retain_labels must be given together")
    if forget_loss == "ihl":
        forget = ihl_loss(forget_logits, forget_labels, ignore_index=ignore_index, margin=margin)
    else:
        forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index)
    total = forget
    retain = torch.zeros((), device=forget.device)
    if retain_logits is not None and retain_weight > 0:
        retain = retain_loss(retain_logits, retain_labels, ignore_index=ignore_index)
        total = forget + retain_weight * retain
    return UnlearningLossOutput(total, forget.detach(), retain.detach())


class UnlearningLoss(nn.Module):
    """Module form of :func:`unlearning_loss` (IHL + retain CE by default; ``forget_loss="ga"`` for GA/GD)."""

    def __init__(
        self, forget_loss: str = "ihl", retain_weight: float = 1.0, ignore_index: int = -100, margin: float = 1.0
    ) -> None:
        super().__init__()
        check_objective(forget_loss, retain_weight, margin, choices=TOKEN_LOSSES)
        self.forget_loss = forget_loss
        self.retain_weight = retain_weight
        self.ignore_index = ignore_index
        self.margin = margin

    def forward(self, forget_logits, forget_labels, retain_logits=None, retain_labels=None) -> UnlearningLossOutput:
        return unlearning_loss(
            forget_logits, forget_labels, retain_logits, retain_labels, forget_loss=self.forget_loss,
            retain_weight=self.retain_weight, ignore_index=self.ignore_index, margin=self.margin,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Sequence losses: NPO and SimNPO
# ---------------------------------------------------------------------------------------------------------
def sequence_logprob(token_logp: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(log pi(y|x) (...,), |y| (...,) int64): per-sequence sums of ``token_logp`` (..., T) float over the
    non-ignored ``targets`` (..., T), and their counts. Ignored positions count 0 whatever ``token_logp`` holds."""
    valid = targets != ignore_index
    return torch.where(valid, token_logp, 0.0).sum(-1), valid.sum(-1)


def _reduce_sequences(rows: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """Per-sequence losses (0 where not ``counted``) reduced: ``mean`` over the counted sequences (0 if none)."""
    validate.check_choice("reduction", reduction, validate.REDUCTIONS)
    rows = torch.where(counted, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / counted.sum().clamp(min=1)


def npo_loss(
    logp: Tensor, ref_logp: Tensor, *, beta: float = NPO_BETA, lengths: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868), per sequence:

        L_NPO = -(2 / beta) log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x)))

    ``logp``, ``ref_logp`` (B,): sequence log-likelihoods (sums over the forget tokens) of the trained and the
    reference model. As beta -> 0 it tends to (log pi_theta - log pi_ref) + 2 log 2 / beta: GA on the sequence
    log-likelihood; it is bounded below by 0 and its gradient, 2 sigmoid(beta (log pi_theta - log pi_ref)) per
    unit of log pi_theta, vanishes as log pi_theta falls below log pi_ref. ``lengths`` (B,) or None:
    sequences with 0 targets are left out (0, not counted). float32; ``mean`` over the counted sequences.
    """
    validate.check_number("beta", beta, 0, strict=True)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)} but logp has {tuple(logp.shape)}")
    ratio = logp.float() - ref_logp.to(logp.device, torch.float32)
    rows = -(2.0 / beta) * F.logsigmoid(-beta * ratio)
    counted = torch.ones_like(rows, dtype=torch.bool) if lengths is None else lengths > 0
    return _reduce_sequences(rows, counted, reduction)


def simnpo_loss(
    logp: Tensor, lengths: Tensor, *, beta: float = SIMNPO_BETA, gamma: float = SIMNPO_GAMMA, reduction: str = "mean"
) -> Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), per sequence, reference-free and length-normalized:

        L_SimNPO = -(2 / beta) log sigmoid(-(beta / |y|) log pi_theta(y|x) - gamma)

    ``logp`` (B,): sequence log-likelihoods, ``lengths`` (B,): |y|, their target counts; sequences with
    |y| = 0 are left out. Defaults beta = 4.5, gamma = 0 are open-unlearning's (configs/trainer/SimNPO.yaml:
    ``beta: 4.5``, ``delta: 0.0``); its ``delta`` enters as -logsigmoid(beta (NLL/|y| - delta)), i.e.
    gamma = beta * delta. float32; ``mean`` over the counted sequences.
    """
    validate.check_number("beta", beta, 0, strict=True)
    validate.check_number("gamma", gamma, 0)
    if lengths.shape != logp.shape:
        raise ValueError(f"lengths has shape {tuple(lengths.shape)} but logp has {tuple(logp.shape)}")
    counted = lengths > 0
    per_token = logp.float() / lengths.clamp(min=1).to(logp.device, torch.float32)
    rows = -(2.0 / beta) * F.logsigmoid(-beta * per_token - gamma)
    return _reduce_sequences(rows, counted, reduction)


def count_sequences(
    input_ids: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100, labels: Tensor | None = None
) -> Tensor:
    """How many sequences (rows of ``input_ids`` (B, T)) have at least one next-token target (int64 scalar)."""
    targets = next_token_targets(input_ids, attention_mask, labels, ignore_index)
    return (targets != ignore_index).any(-1).sum()


def forget_units(
    forget_loss: str, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
) -> Tensor:
    """What a forget term's sum runs over, counted: next-token targets (token losses) or sequences with at least
    one target (sequence losses); ``labels`` (B, T) or None as in :func:`next_token_targets`. The engine divides
    the summed term by the epoch's count."""
    if forget_loss in SEQUENCE_LOSSES:
        return count_sequences(input_ids, attention_mask, labels=labels)
    return count_targets(input_ids, attention_mask, labels)


# (model, batch) -> the forget term summed over the batch's next-token targets (token losses) or sequences
# (sequence losses); the batch is a dict with input_ids and attention_mask (B, T), optionally "labels" (B, T)
# (HF style, -100 where nothing counts: a question/answer pair's prompt), and for NPO "reference" (B,), the
# reference model's sequence log-likelihoods.
ForgetTerm = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
MODEL_KEYS = ("input_ids", "attention_mask")
LABELS_KEY = "labels"
REFERENCE_KEY = "reference"


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's inputs of an engine batch (no ``labels``: the model would compute its own loss with them)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def batch_targets(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a batch (those present): what :func:`shift_causal` and
    :func:`next_token_targets` take by keyword."""
    return {k: batch[k] for k in (*MODEL_KEYS, LABELS_KEY) if batch.get(k) is not None}


def token_logprobs(model: nn.Module, batch: Mapping[str, Tensor], *, fused: bool = False) -> tuple[Tensor, Tensor]:
    """(per-token log p(next token) (B, T - 1) float32, targets (B, T - 1)) of a causal LM on ``batch``; the
    targets follow ``batch["labels"]`` when present. ``fused``: through a model patched by
    :func:`fastunlearn.fused_lm.patch_fused_ihl` (``logprob=True``: from the last hidden states, no logits)."""
    inputs, labels = model_inputs(batch), batch.get(LABELS_KEY)
    targets = next_token_targets(inputs["input_ids"], inputs.get("attention_mask"), labels)
    if fused:
        extra = {} if labels is None else {"labels": labels}
        return model(**inputs, **extra, logprob=True).logprobs, targets
    logits = model(**inputs, use_cache=False).logits
    return token_logprob(logits[..., :-1, :], targets), targets


def forget_term(
    forget_loss: str, *, fused: bool = False, beta: float | None = None, gamma: float | None = None
) -> ForgetTerm:
    """The forget term of the unlearning engine, as a function of (model, batch).

    ``fused=True`` calls a model patched by :func:`fastunlearn.fused_lm.patch_fused_ihl`: IHL from the last
    hidden states (``ihl=True``), or the per-token log-probabilities of GA / NPO / SimNPO (``logprob=True``),
    without the (B, T, V) logits; otherwise the model's logits go through :func:`shift_causal` and the loss.
    IHL / GA: summed over the batch's next-token targets. NPO / SimNPO: summed over the batch's sequences with
    at least one target (:func:`npo_loss`, :func:`simnpo_loss` with ``reduction="sum"``); NPO reads the
    reference log-likelihoods from ``batch["reference"]`` (B,). ``beta`` / ``gamma``: None for the defaults.
    """
    check_objective(forget_loss, 0.0, 1.0, beta, gamma)
    check_fused(forget_loss, fused)
    if forget_loss in SEQUENCE_LOSSES:
        return lambda model, batch: _sequence_term(model, batch, forget_loss, fused, beta, gamma)
    if fused and forget_loss == "ihl":
        return lambda model, batch: model(**batch_targets(batch), ihl=True, reduction="sum").loss
    if fused:  # GA: -CE summed over the targets = the sum of their log-probabilities (0 at ignored targets)
        return lambda model, batch: token_logprobs(model, batch, fused=True)[0].sum()
    loss_fn = ihl_loss if forget_loss == "ihl" else ga_loss
    return lambda model, batch: loss_fn(*_shifted_logits(model, batch), reduction="sum")


def _shifted_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`shift_causal` of the model's logits on ``batch`` (its ``labels``, when present, give the targets)."""
    return shift_causal(model(**model_inputs(batch), use_cache=False).logits, **batch_targets(batch))


def _sequence_term(model, batch, forget_loss: str, fused: bool, beta: float | None, gamma: float | None) -> Tensor:
    logp, lengths = sequence_logprob(*token_logprobs(model, batch, fused=fused))  # (B,), (B,)
    if forget_loss == "simnpo":
        options = {"beta": SIMNPO_BETA if beta is None else beta, "gamma": SIMNPO_GAMMA if gamma is None else gamma}
        return simnpo_loss(logp, lengths, reduction="sum", **options)
    if REFERENCE_KEY not in batch:
        raise ValueError(f"forget_loss='npo' needs the reference log-likelihoods in batch[{REFERENCE_KEY!r}]")
    beta = NPO_BETA if beta is None else beta
    return npo_loss(logp, batch[REFERENCE_KEY], beta=beta, lengths=lengths, reduction="sum")


def retain_term(*, fused: bool = False) -> ForgetTerm:
    """The retain term of the engine as a function of (model, batch): next-token cross-entropy summed over the
    batch's targets. ``fused=True``: minus the summed log-probabilities from a patched model's hidden states
    (``logprob=True``), so the retain batches do not build the (B, T, V) logits either."""
    if fused:
        return lambda model, batch: -token_logprobs(model, batch, fused=True)[0].sum()
    return lambda model, batch: retain_loss(*_shifted_logits(model, batch), reduction="sum")
