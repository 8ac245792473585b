"""``UnlearningTrainer``: a ``transformers.Trainer`` whose loss is the unlearning objective on forget / retain pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.fused_lm import patch_fused_ihl
from fastunlearn.integrations.hf.data import BATCH_KEYS, REFERENCE_KEY, collate_forget_retain, count_targets
from fastunlearn.integrations.hf.loss import unlearning_compute_loss
from fastunlearn.losses import SEQUENCE_LOSSES, UnlearningLossOutput, check_fused, check_objective
from fastunlearn.utils.optional import missing

try:
    from transformers import Trainer
except ImportError as exc:
    raise missing("transformers", "hf", "fastunlearn.integrations.hf") from exc


class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is :func:`unlearning_compute_loss` on a
    :class:`ForgetRetainDataset` (``train_dataset``; an ``eval_dataset`` of one reports that loss as
    ``eval_loss``). Extra keyword arguments ``forget_loss`` ("ihl", "ga", "npo" or "simnpo"), ``retain_weight``,
    ``margin``, ``beta`` / ``gamma`` (NPO, SimNPO; None: defaults), ``fused_ihl`` (patch the model with
    ``patch_fused_ihl`` and compute the forget term without the forget batch's logits); everything else is the
    Trainer's. NPO reads the reference log-likelihoods from the dataset (``ForgetRetainDataset(...,
    reference=reference_logprobs(model, forget))``): no reference model is held. The data collator defaults to
    :func:`collate_forget_retain`, and the batch keys count as model inputs, so ``remove_unused_columns=True``
    keeps them.

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
        beta: float | None = None,
        gamma: float | None = None,
        **trainer_kwargs,
    ) -> None:
        check_objective(forget_loss, retain_weight, margin, beta, gamma)
        check_fused(forget_loss, fused_ihl)
        if fused_ihl:
            patch_fused_ihl(model)  # before the Trainer wraps it
        collator = collate_forget_retain if data_collator is None else data_collator
        super().__init__(model, args, collator, *trainer_args, **trainer_kwargs)
        self.forget_loss, self.retain_weight, self.margin, self.fused_ihl = (
            forget_loss,
            retain_weight,
            margin,
            fused_ihl,
        )
        self.beta, self.gamma = beta, gamma
        self.model_accepts_loss_kwargs = True  # for transformers without loss_is_scaled_for_ga, see above
        self._term_sums: Tensor | None = None  # (2,) forget, retain terms since the last log, on the device
        self._term_steps = 0  # optimizer steps since the last log

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        keys = (*BATCH_KEYS, REFERENCE_KEY)
        self._signature_columns += [key for key in keys if key not in self._signature_columns]

    def _counts_are_global(self) -> bool:
        return self.args.average_tokens_across_devices and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Tensor | None]:
        """The step's micro-batches and their (2,) target counts, summed over processes (see the docstring)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:  # the epoch iterator ran out
            return batches, None
        self._term_steps += 1
        counts = count_targets(batches, sequences=self.forget_loss in SEQUENCE_LOSSES).to(device)
        if self._counts_are_global():
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)  # (processes * 2,) -> (2,)
        return batches, counts

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, terms = unlearning_compute_loss(
            model, inputs, forget_loss=self.forget_loss, retain_weight=self.retain_weight, margin=self.margin,
            num_items_in_batch=num_items_in_batch, return_outputs=True, fused_ihl=self.fused_ihl, beta=self.beta,
            gamma=self.gamma,
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
