"""``UnlearningCallback``: stops a Trainer at the engine's criterion (``fastunlearn.engine.evaluation``)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from fastunlearn.data.text import SequenceSet
from fastunlearn.engine.evaluation import epoch_check
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy
from fastunlearn.integrations.hf.data import check_set
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.optional import missing
from fastunlearn.utils.validate import check_int, is_number

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise missing("transformers", "hf", "fastunlearn.integrations.hf") from exc

logger = logging.getLogger("fastunlearn.integrations.hf")


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
    check_set(name, seqs)
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
        check_int("el_n", el_n, 1)
        check_int("eval_batch_size", eval_batch_size, 1)
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
        measured, met = epoch_check(
            lambda: self._ma(model, self.forget, args.device),
            lambda: self._el(model, self.forget, args.device),
            self.criterion,
        )
        ma, el = measured["ma"], measured["el"]
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
