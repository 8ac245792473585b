"""Bad input to ihl_loss raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastunlearn

Z, Y = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize(
    "logits, labels, kwargs, error, match",
    [
        (Z, Y[:, :2], {}, ValueError, r"labels has shape \(2, 2\) but logits"),
        (Z, Y.float(), {}, TypeError, "labels must be an integer tensor"),
        (Z, Y.bool(), {}, TypeError, "labels must be an integer tensor"),
        (Z.long(), Y, {}, TypeError, "logits must be float32, bfloat16 or float16"),
        (Z.double(), Y, {}, TypeError, "logits must be float32, bfloat16 or float16"),
        (Z, Y.tolist(), {}, TypeError, "labels must be a torch.Tensor"),
        ("logits", Y, {}, TypeError, "logits must be a torch.Tensor"),
        (Z[..., :1], Y, {}, ValueError, "at least 2 classes"),
        (torch.randn(0, 11), torch.zeros(0, dtype=torch.long), {}, ValueError, "labels is empty"),
        (Z, Y, {"reduction": "avg"}, ValueError, "reduction must be one of"),
        (Z, Y, {"margin": 0.0}, ValueError, "margin must be a finite number > 0"),
        (Z, Y, {"margin": float("nan")}, ValueError, "margin must be"),
        (Z, Y + 11, {}, ValueError, r"labels contains \d+, outside \[0, 11\)"),
        (Z, Y - 50, {}, ValueError, "not ignore_index=-100"),
    ],
)
def test_bad_input(logits, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastunlearn.ihl_loss(logits, labels, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_row(value):
    z = Z.clone()
    z[1, 2, 4] = value
    with pytest.raises(ValueError, match="logits has non-finite values in row 5"):
        fastunlearn.ihl_loss(z, Y)


def test_all_minus_inf_row_is_rejected_but_ignored_rows_are_not_checked():
    z = Z.clone()
    z[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="row 0"):
        fastunlearn.ihl_loss(z, Y)
    y = Y.clone()
    y[0, 0] = -100
    assert torch.isfinite(fastunlearn.ihl_loss(z, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    with pytest.raises(ValueError, match="labels is on cpu but logits is on cuda"):
        fastunlearn.ihl_loss(Z.cuda(), Y)
