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

- **NPO / SimNPO** (``forget_loss="npo"`` / ``"simnpo"``): per-sequence losses; N_F counts the forget
  sequences with at least one target (``count_targets(..., sequences=True)``), so the step's loss is the mean
  over its forget sequences. NPO's reference log-likelihoods are computed once by :func:`reference_logprobs`
  (the model with its LoRA adapters disabled, before training) and given to the dataset
  (``ForgetRetainDataset(forget, retain, reference=...)``); no reference model is held.

Not handled: tensor, context or sequence parallelism (they split a batch's tokens across ranks).
"""

from fastunlearn.integrations.hf import requires  # noqa: F401  (first: names the missing extra)
from fastunlearn.integrations.hf.callback import UnlearningCallback
from fastunlearn.integrations.hf.data import (
    BATCH_KEYS,
    FORGET_KEYS,
    REFERENCE_KEY,
    RETAIN_KEYS,
    ForgetRetainDataset,
    collate_forget_retain,
    count_targets,
    reference_logprobs,
)
from fastunlearn.integrations.hf.loss import unlearning_compute_loss
from fastunlearn.integrations.hf.trainer import UnlearningTrainer

__all__ = [
    "BATCH_KEYS",
    "FORGET_KEYS",
    "REFERENCE_KEY",
    "RETAIN_KEYS",
    "ForgetRetainDataset",
    "UnlearningCallback",
    "UnlearningTrainer",
    "collate_forget_retain",
    "count_targets",
    "reference_logprobs",
    "unlearning_compute_loss",
]
