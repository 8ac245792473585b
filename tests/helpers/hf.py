"""The Hugging Face Trainer tests' batches and arguments: a collated batch, the user's own ``TrainingArguments``,
plain SGD (the update is -lr x the gradient) and the tiny model with ragged data that the DDP worker trains."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from fastunlearn.data.text import SequenceSet
from fastunlearn.integrations.hf import ForgetRetainDataset, collate_forget_retain
from tests.helpers.runs import ragged
from tests.helpers.tiny_models import tiny_model

EL_N = 5  # EL_5 fits 16 tokens
SGD = {"optim": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.0}  # the update is -lr x the gradient


def batch(forget: SequenceSet, retain: SequenceSet | None = None) -> dict[str, torch.Tensor]:
    return collate_forget_retain([item for item in ForgetRetainDataset(forget, retain)])


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """The user's own arguments: remove_unused_columns keeps its default True."""
    defaults = {
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
    }
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        **{**defaults, **overrides},
    )  # fmt: skip


def ragged_data() -> tuple[torch.nn.Module, ForgetRetainDataset]:
    return tiny_model("gpt_neo"), ForgetRetainDataset(ragged([9, 5, 7, 3], seed=1), ragged([8, 9, 4], seed=2))
