"""Unlearning inside a Hugging Face ``Trainer`` (Cha et al., arXiv 2408.06621): the user's TrainingArguments,
optimizer, scheduler, DeepSpeed / FSDP setup and loggers stay as they are; only the loss and the data change.

- **Data**: :class:`ForgetRetainDataset` pairs forget row i with retain row i mod len(retain); one epoch is one
  pass over the forget set. :func:`collate_forget_retain` stacks the items into a batch with the keys
  ``forget_input_ids, forget_attention_mask`` and, with a retain set, ``retain_input_ids, retain_attention_mask``
  (right padding, mask 0; a token whose mask is 0 is never a target).
- **Loss** (:func:`unlearning_compute_loss`): with F the forget batch's next-token targets and R the retain
  batch's (``shift_causal``: padding ignored),

      loss = sum_{t in F} forget_t / N_F + retain_weight * sum_{t in R} CE_t / N_R

  where forget_t is the IHL max(0, margin + p_y - max_{v != y} p_v) or, for ``forget_loss="ga"``, -CE_t
  (gradient ascent). ``num_items_in_batch=None``: N_F = |F|, N_R = |R| (each term a mean over this batch).
  ``retain_weight=0`` skips the retain forward. The terms are float32 whatever the model's dtype.
  ``fused_ihl=True`` computes the IHL term from the last hidden states without the (B, T, V) logits
  (``fastunlearn.integrations.patch``; the model must be patched with ``patch_fused_ihl``, which
  ``UnlearningTrainer(fused_ihl=True)`` does before the Trainer wraps it).
- **Gradient accumulation**: the Trainer's own ``num_items_in_batch`` counts ``labels`` (one count), which
  these batches lack. :class:`UnlearningTrainer` instead counts (N_F, N_R) over all the micro-batches of the
  optimizer step (:func:`count_targets`) and passes that pair: each micro-batch then contributes its token
  sums over the step's counts, so the accumulated gradient is exactly that of the full batch's token means,
  whatever the padding and the micro-batch split, and the Trainer does not divide by the accumulation steps
  again. With several processes and ``average_tokens_across_devices`` (the default) the counts are summed
  over the processes and the loss multiplied by their number (DDP / FSDP / DeepSpeed average the gradients):
  the update is that of the token means over the global batch; without it, each process uses its own counts
  and the processes' means are averaged. A Trainer subclass of your own that calls
  :func:`unlearning_compute_loss` with the Trainer's ``num_items_in_batch`` (None for these batches) gets per
  micro-batch means divided by the accumulation steps: exact only when micro-batches hold equal counts.
- **Stop** (:class:`UnlearningCallback`): the engine's criterion (``fastunlearn.unlearn``). After every epoch
  the forget set's mean MA is measured, its mean EL_n only once MA <= the MA limit; training stops once
  MA <= limit and EL_n <= limit. The limits are the held-out set's MA and EL_n measured at the first
  ``on_train_begin`` (the paper), or given thresholds. The engine's epoch is one update from the whole forget
  set: ``per_device_train_batch_size * gradient_accumulation_steps * processes >= len(forget)`` reproduces it.

Not handled: tensor, context or sequence parallelism (they split a batch's tokens across ranks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from .. import distributed as dist_utils
from .._validate import is_int, is_number
from ..data import SequenceSet
from ..ihl import ihl_loss
from ..metrics import extraction_likelihood, memorization_accuracy
from ..objectives import FORGET_LOSSES, UnlearningLossOutput, ga_loss, retain_loss, shift_causal
from .patch import is_fused_ihl_patched, patch_fused_ihl

logger = logging.getLogger(__name__)

FORGET_KEYS = ("forget_input_ids", "forget_attention_mask")
RETAIN_KEYS = ("retain_input_ids", "retain_attention_mask")
BATCH_KEYS = FORGET_KEYS + RETAIN_KEYS


def _check_set(name: str, seqs: object) -> None:
    if not isinstance(seqs, SequenceSet):
        raise TypeError(f"{name} must be a fastunlearn.data.SequenceSet, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{name} is empty: it has no sequences")


def _check_objective(forget_loss: object, retain_weight: object, margin: object) -> None:
    """ValueError naming the bad argument and its value."""
    if forget_loss not in FORGET_LOSSES:
        raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
    if not (is_number(retain_weight) and retain_weight >= 0):
        raise ValueError(f"retain_weight must be a finite number >= 0, got {retain_weight!r}")
    if not (is_number(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
class ForgetRetainDataset(Dataset):
    """Item i: forget row i and, with a retain set, retain row i mod len(retain) (1-D int64 tensors keyed by
    ``BATCH_KEYS``). Its length is the forget set's, so one epoch sees every forget sequence once."""

    def __init__(self, forget: SequenceSet, retain: SequenceSet | None = None) -> None:
        _check_set("forget", forget)
        if retain is not None:
            _check_set("retain", retain)
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = range(len(self))[index]  # IndexError out of range; negative indices count from the end
        item = {
            "forget_input_ids": self.forget.input_ids[index],
            "forget_attention_mask": self.forget.attention_mask[index],
        }
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


def _require(inputs: Mapping[str, Tensor], keys: tuple[str, ...], why: str) -> tuple[Tensor, Tensor]:
    for key in keys:
        if key not in inputs:
            raise ValueError(f"the batch has no {key!r} ({why}); it has {sorted(inputs)}")
    return inputs[keys[0]], inputs[keys[1]]


def _n_targets(attention_mask: Tensor) -> Tensor:
    """Next-token targets of a batch: ``shift_causal`` ignores those whose token is padding."""
    return (attention_mask[:, 1:] != 0).sum()


def count_targets(batches: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """(2,) int64: the forget and retain next-token targets of ``batches`` (the micro-batches of one optimizer
    step), on their device; the ``num_items_in_batch`` of :func:`unlearning_compute_loss`. No retain keys: 0."""
    if not batches:
        raise ValueError("batches is empty: no targets to count")
    counts = []
    for batch in batches:
        _, forget_mask = _require(batch, FORGET_KEYS, "every batch needs its forget sequences")
        retain_mask = batch.get(RETAIN_KEYS[1])
        retain = forget_mask.new_zeros((), dtype=torch.int64) if retain_mask is None else _n_targets(retain_mask)
        counts.append(torch.stack([_n_targets(forget_mask), retain]))
    return torch.stack(counts).sum(0)  # (batches, 2) -> (2,)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------
def _token_sum(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_fn, **options) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    return loss_fn(*shift_causal(logits, input_ids, attention_mask), reduction="sum", **options)


def _fused_ihl_sum(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, margin: float) -> Tensor:
    """The IHL token sum through a patched model's fused path (through any wrapper's forward: DDP, FSDP)."""
    inner = getattr(model, "module", model)  # DDP / DataParallel keep the model in .module
    if not (is_fused_ihl_patched(model) or is_fused_ihl_patched(inner)):
        raise ValueError("fused_ihl=True needs a model patched by fastunlearn.integrations.patch.patch_fused_ihl")
    out = model(input_ids=input_ids, attention_mask=attention_mask, ihl=True, reduction="sum", margin=margin)
    return out.loss


def _step_counts(num_items_in_batch, inputs: Mapping[str, Tensor], device: torch.device) -> Tensor:
    """(2,) float (N_F, N_R), each at least 1 (an all-padding term is then 0, not NaN)."""
    if num_items_in_batch is None:
        return count_targets([inputs]).to(device).clamp(min=1).float()
    counts = torch.as_tensor(num_items_in_batch)
    if counts.shape != (2,):
        raise ValueError(
            f"num_items_in_batch must be None or the (forget targets, retain targets) of the optimizer step, as "
            f"count_targets returns; got {num_items_in_batch!r} (a single count, such as the Trainer's count of "
            f"labels, cannot normalize the two terms)"
        )
    return counts.to(device).clamp(min=1).float()


def unlearning_compute_loss(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    forget_loss: str = "ihl",
    retain_weight: float = 1.0,
    margin: float = 1.0,
    num_items_in_batch: Tensor | Sequence[int] | None = None,
    return_outputs: bool = False,
    fused_ihl: bool = False,
) -> Tensor | tuple[Tensor, UnlearningLossOutput]:
    """forget term + retain_weight x retain CE on a :func:`collate_forget_retain` batch, for any Trainer's
    ``compute_loss`` (see the module docstring for the normalization).

    ``num_items_in_batch``: None (token means over this batch) or the (2,) counts (N_F, N_R) of the whole
    optimizer step from :func:`count_targets`. ``return_outputs``: also return the
    ``UnlearningLossOutput(total, forget, retain)`` with the detached terms (retain 0 when not computed).
    ``fused_ihl``: the IHL term from hidden states (a model patched by ``patch_fused_ihl``; IHL only).
    ValueError names a missing batch key or a bad argument.
    """
    _check_objective(forget_loss, retain_weight, margin)
    if fused_ihl and forget_loss != "ihl":
        raise ValueError(f"fused_ihl=True computes the IHL term; forget_loss={forget_loss!r} has no fused path")
    forget_ids, forget_mask = _require(inputs, FORGET_KEYS, "the forget term needs the forget sequences")
    use_retain = retain_weight > 0
    if use_retain:
        why = f"retain_weight={retain_weight} needs the retain sequences; set retain_weight=0 for none"
        retain_ids, retain_mask = _require(inputs, RETAIN_KEYS, why)
    if fused_ihl:
        forget_sum = _fused_ihl_sum(model, forget_ids, forget_mask, margin)
    elif forget_loss == "ihl":
        forget_sum = _token_sum(model, forget_ids, forget_mask, ihl_loss, margin=margin)
    else:
        forget_sum = _token_sum(model, forget_ids, forget_mask, ga_loss)
    n_forget, n_retain = _step_counts(num_items_in_batch, inputs, forget_sum.device)
    forget = forget_sum / n_forget
    total, retain = forget, torch.zeros((), device=forget.device)
    if use_retain:
        retain = _token_sum(model, retain_ids, retain_mask, retain_loss) / n_retain
        total = forget + retain_weight * retain
    return (total, UnlearningLossOutput(total, forget.detach(), retain.detach())) if return_outputs else total


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------
class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is :func:`unlearning_compute_loss` on a
    :class:`ForgetRetainDataset` (``train_dataset``; an ``eval_dataset`` of one reports that loss as
    ``eval_loss``). Extra keyword arguments ``forget_loss`` ("ihl" or "ga"), ``retain_weight``, ``margin``,
    ``fused_ihl`` (patch the model with ``patch_fused_ihl`` and compute IHL without the forget batch's
    logits); everything else is the Trainer's. The data collator defaults to :func:`collate_forget_retain`, and the
    batch keys count as model inputs, so ``remove_unused_columns=True`` keeps them.

    Every training log with a ``loss`` also gets ``forget_loss`` and ``retain_loss`` (unweighted), averaged
    over the steps since the previous log like ``loss``. The model is never wrapped here: DeepSpeed / FSDP /
    DDP setups go through the Trainer's accelerate path unchanged.
    """

    # compute_loss normalizes by the token counts of the whole optimizer step (get_batch_samples), so the
    # Trainer must not divide by the accumulation steps. Recent transformers read this attribute; earlier
    # versions decide from model_accepts_loss_kwargs and num_items_in_batch (never None in training here),
    # which __init__ makes agree.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        *trainer_args,
        forget_loss: str = "ihl",
        retain_weight: float = 1.0,
        margin: float = 1.0,
        fused_ihl: bool = False,
        **trainer_kwargs,
    ) -> None:
        _check_objective(forget_loss, retain_weight, margin)
        if fused_ihl:
            if forget_loss != "ihl":
                raise ValueError(f"fused_ihl=True computes the IHL term; forget_loss={forget_loss!r} has no fused path")
            patch_fused_ihl(model)  # before the Trainer wraps it
        collator = collate_forget_retain if data_collator is None else data_collator
        super().__init__(model, args, collator, *trainer_args, **trainer_kwargs)
        self.forget_loss, self.retain_weight, self.margin, self.fused_ihl = (
            forget_loss,
            retain_weight,
            margin,
            fused_ihl,
        )
        self.model_accepts_loss_kwargs = True  # for transformers without loss_is_scaled_for_ga, see above
        self._term_sums: Tensor | None = None  # (2,) forget, retain terms since the last log, on the device
        self._term_steps = 0  # optimizer steps since the last log

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in BATCH_KEYS if key not in self._signature_columns]

    def _counts_are_global(self) -> bool:
        return self.args.average_tokens_across_devices and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Tensor | None]:
        """The step's micro-batches and their (2,) target counts, summed over processes (see the docstring)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:  # the epoch iterator ran out
            return batches, None
        self._term_steps += 1
        counts = count_targets(batches).to(device)
        if self._counts_are_global():
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)  # (processes * 2,) -> (2,)
        return batches, counts

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, terms = unlearning_compute_loss(
            model, inputs, forget_loss=self.forget_loss, retain_weight=self.retain_weight, margin=self.margin,
            num_items_in_batch=num_items_in_batch, return_outputs=True, fused_ihl=self.fused_ihl,
        )  # fmt: skip
        if num_items_in_batch is not None and self._counts_are_global():
            scale = self.accelerator.num_processes  # the processes' gradients are averaged, not summed
            loss = loss * scale
            terms = UnlearningLossOutput(loss, terms.forget * scale, terms.retain * scale)
        if model.training:
            step_terms = torch.stack([terms.forget, terms.retain])
            self._term_sums = step_terms if self._term_sums is None else self._term_sums + step_terms
        return (loss, terms) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The unlearning loss of an eval batch (token means over the batch); no logits or labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_sums is not None:
            means = self.accelerator.gather(self._term_sums).view(-1, 2).mean(0) / max(self._term_steps, 1)
            logs["forget_loss"], logs["retain_loss"] = means.tolist()
            self._term_sums, self._term_steps = None, 0
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------------------
# Stop criterion
# ---------------------------------------------------------------------------------------------------------
def _rank0_value(value: float, device: torch.device) -> float:
    """Rank 0's value on every process (unchanged without torch.distributed).

    Every rank measures the full set on the same weights, so the values agree up to kernel nondeterminism;
    taking rank 0's makes them identical, so every rank takes the same branch: all or none run EL's forward
    calls (collectives under FSDP / ZeRO-3) and leave the training loop.
    """
    if not dist_utils.current().distributed:
        return value
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return shared.item()


def _check_scored(name: str, seqs: object, el_n: int) -> None:
    """A set whose MA and EL_n are measured: every sequence has more than el_n real tokens."""
    _check_set(name, seqs)
    seqs.check_el_length(name, el_n)


class UnlearningCallback(TrainerCallback):
    """Stops training once the forget set is unlearned: mean MA <= ``criterion["ma"]`` and mean EL_n <=
    ``criterion["el"]``, checked at every epoch end (EL only once MA meets its limit, as the engine does).

    Give either ``heldout`` (the paper: the limits are its MA and EL_n, measured at the first
    ``on_train_begin``, before any update) or both ``ma_threshold`` and ``el_threshold`` (in [0, 1]). A run
    resumed from a checkpoint would measure the held-out set on the resumed weights: give it the first run's
    ``criterion`` limits as thresholds instead.

    Every process evaluates the whole forget (and held-out) set: under FSDP or ZeRO-3 a forward call is a
    collective that all ranks must make with the same shapes, and equal inputs on equal weights give the same
    decision everywhere (rank 0's mean MA and EL are broadcast to settle rounding differences). EL decodes only
    the prefixes the model deviates on, so its number of forward calls follows the greedy predictions: equal on
    every rank unless two logits tie within rounding. The cost is the evaluation's, not a sharded one's;
    ``eval_batch_size`` sequences per forward.

    Results: ``criterion`` {"stop", "ma", "el"}, ``baseline`` (the held-out {"ma", "el"}, or None) and
    ``history``, one record per epoch end: {"epoch", "step", "forget_ma", "forget_el" (None when not
    measured), "criterion_met"}; each record also goes to ``state.log_history`` and the module's logger (the
    Trainer's reporters, e.g. TensorBoard, do not see it). The model is left in train mode.
    """

    def __init__(
        self,
        forget: SequenceSet,
        heldout: SequenceSet | None = None,
        *,
        ma_threshold: float | None = None,
        el_threshold: float | None = None,
        el_n: int = 10,
        eval_batch_size: int = 32,
    ) -> None:
        for name, value in (("el_n", el_n), ("eval_batch_size", eval_batch_size)):
            if not is_int(value, 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        thresholds = {"ma_threshold": ma_threshold, "el_threshold": el_threshold}
        if heldout is None:
            for name, value in thresholds.items():
                if not (is_number(value) and 0 <= value <= 1):
                    raise ValueError(f"{name} must be a number in [0, 1] when no heldout set is given, got {value!r}")
        else:
            for name, value in thresholds.items():
                if value is not None:
                    raise ValueError(f"{name} is only used without a heldout set (which sets it), got {value!r}")
        _check_scored("forget", forget, el_n)
        if heldout is not None:
            _check_scored("heldout", heldout, el_n)
        self.forget, self.heldout, self.el_n, self.eval_batch_size = forget, heldout, el_n, eval_batch_size
        self.baseline: dict[str, float] | None = None
        self.criterion: dict | None = None
        if heldout is None:
            self.criterion = {"stop": "threshold", "ma": ma_threshold, "el": el_threshold}
        self.history: list[dict] = []

    def _ma(self, model: nn.Module, seqs: SequenceSet, device: torch.device) -> float:
        ma = memorization_accuracy(model, seqs.input_ids, seqs.attention_mask, batch_size=self.eval_batch_size)
        return _rank0_value(ma.mean().item(), device)

    def _el(self, model: nn.Module, seqs: SequenceSet, device: torch.device) -> float:
        el = extraction_likelihood(
            model, seqs.input_ids, self.el_n, attention_mask=seqs.attention_mask, batch_size=self.eval_batch_size
        )
        return _rank0_value(el.mean().item(), device)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.criterion is None:  # the held-out limits, once: a later train() call continues the unlearning
            self.baseline = {
                "ma": self._ma(model, self.heldout, args.device),
                "el": self._el(model, self.heldout, args.device),
            }
            self.criterion = {"stop": "heldout", **self.baseline}
            ma, el = self.baseline["ma"], self.baseline["el"]
            logger.info("criterion (held-out set): forget MA <= %.4f, EL_%d <= %.4f", ma, self.el_n, el)
            model.train()
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        crit = self.criterion
        ma = self._ma(model, self.forget, args.device)
        el = self._el(model, self.forget, args.device) if ma <= crit["ma"] else None
        met = el is not None and el <= crit["el"]
        record = {
            "epoch": state.epoch,
            "step": state.global_step,
            "forget_ma": ma,
            "forget_el": el,
            "criterion_met": met,
        }
        self.history.append(record)
        state.log_history.append(dict(record))
        logger.info(
            "epoch %.2f (step %d): forget MA %.4f EL_%d %s | criterion %s", state.epoch, state.global_step, ma,
            self.el_n, "-" if el is None else f"{el:.4f}", "met: stopping" if met else "not met",
        )  # fmt: skip
        if met:
            control.should_training_stop = True
        model.train()
        return control
