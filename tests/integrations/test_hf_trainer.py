"""The Hugging Face integration: the loss against a hand computation, gradient accumulation that equals one full
batch, a tiny memorizer unlearned by UnlearningTrainer and stopped by UnlearningCallback, and the errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastunlearn.data.text import SequenceSet
from fastunlearn.fused_lm import patch_fused_ihl
from fastunlearn.integrations.hf import (
    ForgetRetainDataset,
    UnlearningTrainer,
    collate_forget_retain,
    count_targets,
    unlearning_compute_loss,
)
from fastunlearn.losses import UnlearningLossOutput, ga_loss, retain_loss, shift_causal
from fastunlearn.ops.ihl import ihl_loss
from tests.helpers.hf import SGD, batch, ragged_data, training_args
from tests.helpers.paths import ROOT
from tests.helpers.runs import ragged
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# One SGD step of UnlearningTrainer on 2 processes (DDP, gloo), batch 1 x 2 accumulation steps each, with a
# callback whose thresholds are met at once; each rank saves its parameters, logs and callback history.
DDP_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from tests.helpers.hf import SGD, ragged_data, training_args
    from fastunlearn.integrations.hf import UnlearningCallback, UnlearningTrainer

    out = sys.argv[1]
    model, data = ragged_data()
    args = training_args(out, **SGD, num_train_epochs=3, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                         ddp_backend="gloo")
    callback = UnlearningCallback(data.forget, ma_threshold=1.0, el_threshold=1.0, el_n=2)
    trainer = UnlearningTrainer(model=model, args=args, train_dataset=data, retain_weight=0.5, callbacks=[callback])
    trainer.train()
    torch.save({"params": [p.detach() for p in model.parameters()], "log": trainer.state.log_history,
                "history": callback.history, "world": args.world_size, "step": trainer.state.global_step},
               f"{out}/rank{os.environ['RANK']}.pt")
    torch.distributed.destroy_process_group()  # gloo's threads stopped before exit, not torn down by it
    """
)


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def tiny():
    return tiny_model("gpt_neo")


@pytest.fixture
def ragged_sets():
    """forget: 4 rows, retain: 3 rows (forget row 3 pairs with retain row 0); padding of different lengths."""
    return ragged([9, 5, 7, 3], seed=1), ragged([8, 9, 4], seed=2)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def test_dataset_pairs_forget_row_i_with_retain_row_i_mod_len(ragged_sets):
    forget, retain = ragged_sets
    data = ForgetRetainDataset(forget, retain)
    assert len(data) == 4
    for i in range(4):
        item = data[i]
        assert torch.equal(item["forget_input_ids"], forget.input_ids[i])
        assert torch.equal(item["forget_attention_mask"], forget.attention_mask[i])
        assert torch.equal(item["retain_input_ids"], retain.input_ids[i % 3])
        assert torch.equal(item["retain_attention_mask"], retain.attention_mask[i % 3])
    assert torch.equal(data[-1]["retain_input_ids"], retain.input_ids[0])
    with pytest.raises(IndexError):
        data[4]
    full = batch(forget, retain)
    assert full["retain_input_ids"].shape == (4, 9) and torch.equal(full["forget_input_ids"], forget.input_ids)
    assert sorted(ForgetRetainDataset(forget)[0]) == ["forget_attention_mask", "forget_input_ids"]
    assert count_targets([full]).tolist() == [8 + 4 + 6 + 2, 7 + 8 + 3 + 7]  # length - 1 per row


def test_dataset_and_collator_errors(ragged_sets):
    forget, retain = ragged_sets
    with pytest.raises(TypeError, match="forget must be a fastunlearn.data.SequenceSet"):
        ForgetRetainDataset(forget.input_ids)
    with pytest.raises(ValueError, match="retain is empty"):
        ForgetRetainDataset(forget, retain[[]])
    items = [ForgetRetainDataset(forget, retain)[0], ForgetRetainDataset(forget)[1]]
    with pytest.raises(ValueError, match="feature 1 has keys"):
        collate_forget_retain(items)
    with pytest.raises(ValueError, match="features is empty"):
        collate_forget_retain([])


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------
def hand_loss(model, forget: SequenceSet, retain: SequenceSet | None, forget_loss: str, retain_weight: float, margin):
    def shifted(seqs):
        logits = model(seqs.input_ids, attention_mask=seqs.attention_mask).logits  # (B, T, V)
        return shift_causal(logits, seqs.input_ids, seqs.attention_mask)

    forget_term = ihl_loss(*shifted(forget), margin=margin) if forget_loss == "ihl" else ga_loss(*shifted(forget))
    if retain is None:
        return forget_term
    return forget_term + retain_weight * retain_loss(*shifted(retain))


@pytest.mark.parametrize(
    ("forget_loss", "retain_weight", "margin"), [("ihl", 1.0, 1.0), ("ihl", 0.5, 0.5), ("ga", 2.0, 1.0)]
)
def test_loss_and_gradient_match_the_hand_computation(tiny, ragged_sets, forget_loss, retain_weight, margin):
    forget, retain = ragged_sets
    paired = retain[[0, 1, 2, 0]]  # what the dataset pairs with forget rows 0..3
    expected = hand_loss(tiny, forget, paired, forget_loss, retain_weight, margin)
    expected.backward()
    expected_grads = grads(tiny)
    tiny.zero_grad()
    loss, terms = unlearning_compute_loss(
        tiny, batch(forget, retain), forget_loss=forget_loss, retain_weight=retain_weight, margin=margin,
        return_outputs=True,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.total is loss and not terms.forget.requires_grad
    assert (terms.forget + retain_weight * terms.retain).item() == pytest.approx(loss.item(), rel=1e-6)
    for got, want in zip(grads(tiny), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if forget_loss == "ga":
        assert terms.forget.item() < 0  # the negated cross-entropy


def test_retain_weight_zero_ignores_the_retain_batch(tiny, ragged_sets):
    forget, retain = ragged_sets
    calls = []
    hook = tiny.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"]), with_kwargs=True
    )
    with_retain = unlearning_compute_loss(tiny, batch(forget, retain), retain_weight=0.0, return_outputs=True)
    without = unlearning_compute_loss(tiny, batch(forget), retain_weight=0.0)
    hook.remove()
    assert len(calls) == 2 and all(torch.equal(ids, forget.input_ids) for ids in calls)  # no retain forward
    assert with_retain[0].item() == without.item() == pytest.approx(hand_loss(tiny, forget, None, "ihl", 0, 1).item())
    assert with_retain[1].retain.item() == 0.0


def test_step_counts_make_micro_batches_sum_to_the_full_batch(tiny, ragged_sets):
    """Each micro-batch's sums over the step's (N_F, N_R): the accumulated loss and gradient are the full batch's."""
    forget, retain = ragged_sets
    full = batch(forget, retain)
    micro = [{key: value[rows] for key, value in full.items()} for rows in ([0, 3], [1, 2])]  # unequal counts
    counts = count_targets(micro)
    assert counts.tolist() == count_targets([full]).tolist()
    expected = unlearning_compute_loss(tiny, full)
    expected.backward()
    expected_grads = grads(tiny)
    tiny.zero_grad()
    total = 0.0
    for part in micro:
        loss = unlearning_compute_loss(tiny, part, num_items_in_batch=counts)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads(tiny), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    tiny.zero_grad()
    for part in micro:  # per micro-batch means, averaged: a different gradient with these unequal counts
        (unlearning_compute_loss(tiny, part) / 2).backward()
    assert max((got - want).abs().max() for got, want in zip(grads(tiny), expected_grads)) > 1e-3


def test_missing_keys_and_bad_arguments_are_named(tiny, ragged_sets):
    forget, retain = ragged_sets
    full = batch(forget, retain)
    with pytest.raises(ValueError, match="no 'forget_input_ids'"):
        unlearning_compute_loss(tiny, {k: v for k, v in full.items() if k != "forget_input_ids"})
    with pytest.raises(ValueError, match="no 'retain_attention_mask'.*retain_weight=1.0"):
        unlearning_compute_loss(tiny, {k: v for k, v in full.items() if k != "retain_attention_mask"})
    with pytest.raises(ValueError, match="no 'forget_attention_mask'"):
        count_targets([{"forget_input_ids": forget.input_ids}])
    with pytest.raises(ValueError, match="num_items_in_batch must be None or the"):
        unlearning_compute_loss(tiny, full, num_items_in_batch=torch.tensor(20))
    for kwargs, match in [
        ({"forget_loss": "kl"}, "forget_loss must be one of"),
        ({"retain_weight": -1.0}, "retain_weight must be a finite number >= 0, got -1.0"),
        ({"retain_weight": float("nan")}, "retain_weight must be"),
        ({"margin": 0}, "margin must be a finite number > 0, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            unlearning_compute_loss(tiny, full, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# UnlearningTrainer
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forget_loss": "ascent"}, "forget_loss must be one of \\('ihl', 'ga', 'npo', 'simnpo'\\), got 'ascent'"),
        ({"retain_weight": -0.5}, "retain_weight must be a finite number >= 0, got -0.5"),
        ({"retain_weight": True}, "retain_weight must be a finite number >= 0, got True"),
        ({"margin": -1.0}, "margin must be a finite number > 0, got -1.0"),
    ],
)
def test_trainer_rejects_bad_arguments(tiny, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearningTrainer(model=tiny, args=training_args(tmp_path), **kwargs)


def full_batch_update(model, data: ForgetRetainDataset) -> tuple[list[torch.Tensor], UnlearningLossOutput]:
    """(parameters after one SGD step on the whole dataset as one batch, the loss terms before it)."""
    model = copy.deepcopy(model)
    _, terms = unlearning_compute_loss(model, batch(data.forget, data.retain), retain_weight=0.5, return_outputs=True)
    terms.total.backward()
    return [p.detach() - SGD["learning_rate"] * p.grad for p in model.parameters()], terms


def assert_update(params, log: dict, expected: list[torch.Tensor], terms: UnlearningLossOutput) -> None:
    assert log["loss"] == pytest.approx(terms.total.item(), rel=1e-5)
    assert log["forget_loss"] == pytest.approx(terms.forget.item(), rel=1e-5)
    assert log["retain_loss"] == pytest.approx(terms.retain.item(), rel=1e-5)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_full_batch_update(tiny, ragged_sets, tmp_path):
    """One SGD step over 4 ragged pairs, split 1 x 4, 2 x 2 and 4 x 1: the update of the full batch's token means."""
    data = ForgetRetainDataset(*ragged_sets)
    expected, terms = full_batch_update(tiny, data)
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        model = copy.deepcopy(tiny)
        args = training_args(
            tmp_path, **SGD, max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, per_device_eval_batch_size=len(data),
        )  # fmt: skip
        trainer = UnlearningTrainer(model=model, args=args, train_dataset=data, retain_weight=0.5)
        evaluation = trainer.evaluate(data)  # one batch of 4; its terms stay out of the training logs
        assert evaluation["eval_loss"] == pytest.approx(terms.total.item(), rel=1e-5)
        trainer.train()
        (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert_update(model.parameters(), log, expected, terms)


def test_fused_ihl_trainer_gives_the_unfused_update(tiny, ragged_sets, tmp_path):
    """fused_ihl=True: IHL from hidden states (the LM head is never called on forget batches), same update."""
    data = ForgetRetainDataset(*ragged_sets)
    expected, terms = full_batch_update(tiny, data)
    model = copy.deepcopy(tiny)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    args = training_args(tmp_path, **SGD, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = UnlearningTrainer(model=model, args=args, train_dataset=data, retain_weight=0.5, fused_ihl=True)
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert_update(model.parameters(), log, expected, terms)
    assert len(head_calls) == 2  # the two retain micro-batches only


def test_fused_ihl_needs_a_patched_model_and_ihl(tiny, ragged_sets, tmp_path):
    with pytest.raises(ValueError, match="patch_fused_ihl"):
        unlearning_compute_loss(tiny, batch(*ragged_sets), fused_ihl=True)
    with pytest.raises(ValueError, match="patch_fused_ihl"):
        unlearning_compute_loss(tiny, batch(*ragged_sets), forget_loss="ga", fused_ihl=True)


def test_fused_ga_equals_ga_through_the_logits(tiny, ragged_sets):
    """GA from the hidden states (the summed log-probabilities) = -CE through the logits, value and gradient."""
    model = copy.deepcopy(tiny)
    patch_fused_ihl(model)
    inputs = batch(*ragged_sets)
    fused = unlearning_compute_loss(model, inputs, forget_loss="ga", fused_ihl=True)
    fused.backward()
    plain = unlearning_compute_loss(tiny, inputs, forget_loss="ga")
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), tiny.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_give_the_full_batch_update_and_stop_together(tmp_path):
    """DDP (gloo): token counts summed over the processes, the loss scaled by their number, the logged terms
    gathered, the callback's values taken from rank 0: both ranks make the full batch's update and stop."""
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "worker.py", "."]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, terms = full_batch_update(*ragged_data())
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for saved in ranks:
        assert saved["world"] == 2 and saved["step"] == 1  # 3 epochs asked, stopped after the first
        assert_update(saved["params"], saved["log"][0], expected, terms)
        assert [record["criterion_met"] for record in saved["history"]] == [True]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["log"][0] == ranks[1]["log"][0]
