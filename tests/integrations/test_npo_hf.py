"""NPO and SimNPO in the Hugging Face integration: the reference given through the dataset (computed once by
reference_logprobs), the loss against the objectives, sequence counts that make gradient accumulation equal
the full batch (SGD), the fused path, and the errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastunlearn.integrations.hf import (
    REFERENCE_KEY,
    ForgetRetainDataset,
    UnlearningTrainer,
    collate_forget_retain,
    count_targets,
    reference_logprobs,
    unlearning_compute_loss,
)
from fastunlearn.losses import npo_loss, retain_loss, sequence_logprob, shift_causal, simnpo_loss, token_logprobs
from tests.helpers.hf import SGD, batch, training_args
from tests.helpers.runs import ragged
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny():
    return tiny_model("gpt_neo")


@pytest.fixture
def sets():
    return ragged([9, 5, 7, 3], seed=1), ragged([8, 9, 4], seed=2)


def npo_data(model, forget, retain, shift: float = 0.0) -> ForgetRetainDataset:
    ref = reference_logprobs(model, forget) + shift * torch.arange(len(forget))  # shift: not at pi_ref
    return ForgetRetainDataset(forget, retain, reference=ref)


def hand_loss(model, data: ForgetRetainDataset, loss: str, retain_weight: float) -> torch.Tensor:
    """The objectives on the whole batch: mean over forget sequences + retain_weight x retain token mean."""
    full = collate_forget_retain(list(data))
    forget = {"input_ids": full["forget_input_ids"], "attention_mask": full["forget_attention_mask"]}
    logp, lengths = sequence_logprob(*token_logprobs(model, forget))
    term = npo_loss(logp, full[REFERENCE_KEY], lengths=lengths) if loss == "npo" else simnpo_loss(logp, lengths)
    ids, mask = full["retain_input_ids"], full["retain_attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    return term + retain_weight * retain_loss(*shift_causal(logits, ids, mask))


def test_dataset_carries_the_reference(tiny, sets):
    forget, retain = sets
    data = npo_data(tiny, forget, retain)
    assert data[2][REFERENCE_KEY].shape == () and data[2][REFERENCE_KEY] == data.reference[2]
    assert collate_forget_retain(list(data))[REFERENCE_KEY].shape == (4,)
    assert (data.reference < 0).all() and REFERENCE_KEY not in ForgetRetainDataset(forget)[0]
    with pytest.raises(ValueError, match=r"reference must have shape \(4,\), one value per forget sequence, got \(3,"):
        ForgetRetainDataset(forget, reference=torch.zeros(3))
    with pytest.raises(TypeError, match="reference must be a float tensor, got torch.int64"):
        ForgetRetainDataset(forget, reference=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="reference has non-finite values"):
        ForgetRetainDataset(forget, reference=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    assert count_targets([batch(forget, retain)], sequences=True).tolist() == [4, 7 + 8 + 3 + 7]


@pytest.mark.parametrize("loss", ["npo", "simnpo"])
def test_loss_matches_the_objectives_and_accumulates_to_the_full_batch(tiny, sets, loss):
    data = npo_data(tiny, *sets, shift=3.0)
    full = collate_forget_retain(list(data))
    expected = hand_loss(tiny, data, loss, 0.5)
    got = unlearning_compute_loss(tiny, full, forget_loss=loss, retain_weight=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    want = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    micro = [{k: v[rows] for k, v in full.items()} for rows in ([0, 3], [1], [2])]
    counts = count_targets(micro, sequences=True)
    for part in micro:
        unlearning_compute_loss(tiny, part, forget_loss=loss, retain_weight=0.5, num_items_in_batch=counts).backward()
    for p, w in zip(tiny.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("loss", "fused"), [("npo", False), ("npo", True), ("simnpo", False)])
def test_trainer_makes_the_full_batch_update(tiny, sets, tmp_path, loss, fused):
    """One SGD step over 4 forget sequences in micro-batches of 2 x 2 accumulation steps: the full batch's
    update; NPO's first loss is (2 / beta) log 2 (pi_theta = pi_ref before the first update)."""
    data = npo_data(tiny, *sets)
    model = copy.deepcopy(tiny)
    expected_loss = hand_loss(model, data, loss, 0.5)
    expected_loss.backward()
    expected = [p.detach() - SGD["learning_rate"] * p.grad for p in model.parameters()]
    model = copy.deepcopy(tiny)
    args = training_args(tmp_path, **SGD, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = UnlearningTrainer(model=model, args=args, train_dataset=data, retain_weight=0.5, forget_loss=loss,
                                fused_ihl=fused)  # fmt: skip
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    if loss == "npo":
        assert log["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-5)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_npo_errors(tiny, sets, tmp_path):
    forget, retain = sets
    with pytest.raises(ValueError, match="forget_loss='npo' needs the batch key 'forget_reference'"):
        unlearning_compute_loss(tiny, batch(forget, retain), forget_loss="npo")
    with pytest.raises(ValueError, match="needs a model patched"):
        unlearning_compute_loss(tiny, collate_forget_retain(list(npo_data(tiny, *sets))), forget_loss="npo",
                                fused_ihl=True)  # fmt: skip
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got -1"):
        UnlearningTrainer(model=tiny, args=training_args(tmp_path), forget_loss="npo", beta=-1)
    with pytest.raises(ValueError, match="gamma is a parameter of 'simnpo', not of forget_loss='npo'"):
        UnlearningTrainer(model=tiny, args=training_args(tmp_path), forget_loss="npo", gamma=1.0)
