"""GA / retain terms, the combined objective and the causal-LM shift."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastunlearn
from tests.helpers.reference import ihl_reference


def test_retain_and_ga_match_cross_entropy():
    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    labels[0, 1] = -100
    ce = F.cross_entropy(logits.view(-1, 13), labels.view(-1))
    assert torch.allclose(fastunlearn.retain_loss(logits, labels), ce)
    assert torch.allclose(fastunlearn.ga_loss(logits, labels), -ce)
    rows = fastunlearn.retain_loss(logits, labels, reduction="none")
    assert rows.shape == labels.shape and rows[0, 1] == 0


def test_all_ignored_retain_loss_is_zero_not_nan():
    logits = torch.randn(3, 7, requires_grad=True)
    loss = fastunlearn.retain_loss(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0


def test_shift_causal_masks_padding_and_user_labels():
    logits = torch.randn(2, 4, 9)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    shifted, targets = fastunlearn.shift_causal(logits, ids, mask)
    assert shifted.shape == (2, 3, 9) and shifted.data_ptr() == logits.data_ptr()
    assert targets.tolist() == [[2, 3, 4], [6, -100, -100]]
    labels = ids.clone()
    labels[0, 2] = -100
    assert fastunlearn.shift_causal(logits, ids, labels=labels)[1][0].tolist() == [2, -100, 4]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        fastunlearn.shift_causal(logits, ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids has shape"):
        fastunlearn.shift_causal(logits, ids[:, :3])


def test_causal_lm_ihl_loss_equals_manual_shift():
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    expected_targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = ihl_reference(logits[:, :-1], expected_targets)
    got = fastunlearn.causal_lm_ihl_loss(logits, ids, mask)
    assert torch.allclose(got.double(), expected, atol=1e-6)


def test_unlearning_loss_combines_terms():
    f_logits, r_logits = torch.randn(4, 10), torch.randn(6, 10)
    f_labels, r_labels = torch.randint(0, 10, (4,)), torch.randint(0, 10, (6,))
    out = fastunlearn.unlearning_loss(f_logits, f_labels, r_logits, r_labels, retain_weight=0.5)
    ihl = fastunlearn.ihl_loss(f_logits, f_labels)
    ce = fastunlearn.retain_loss(r_logits, r_labels)
    assert torch.allclose(out.total, ihl + 0.5 * ce) and torch.allclose(out.forget, ihl)
    gd = fastunlearn.UnlearningLoss(forget_loss="ga")(f_logits, f_labels, r_logits, r_labels)
    assert torch.allclose(gd.total, -fastunlearn.retain_loss(f_logits, f_labels) + ce)
    alone = fastunlearn.unlearning_loss(f_logits, f_labels)
    assert torch.equal(alone.total, ihl) and alone.retain.item() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"forget_loss": "npo"}, "forget_loss must be one of"), ({"retain_weight": -1.0}, "retain_weight must be")],
)
def test_unlearning_loss_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastunlearn.unlearning_loss(torch.randn(2, 5), torch.tensor([1, 2]), **kwargs)
    with pytest.raises(ValueError, match=match):
        fastunlearn.UnlearningLoss(**kwargs)
    with pytest.raises(ValueError, match="given together"):
        fastunlearn.unlearning_loss(torch.randn(2, 5), torch.tensor([1, 2]), torch.randn(2, 5))
