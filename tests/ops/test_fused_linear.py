"""fused_linear_ihl equals IHL of the explicit logits, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch

import fastunlearn
from tests.helpers.backends import IMPL_PARAMS
from tests.helpers.reference import assert_close_verbose, ihl_reference


def make_inputs(n_rows=11, hidden=16, n_classes=37, dtype=torch.float32, bias=True):
    h = torch.randn(n_rows, hidden, dtype=dtype)
    w = (torch.randn(n_classes, hidden) / hidden**0.5).to(dtype)
    b = torch.randn(n_classes, dtype=dtype) if bias else None
    labels = torch.randint(0, n_classes, (n_rows,))
    labels[::4] = -100
    return h, w, b, labels


def grads_of(fn, tensors, weights=None):
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    (loss if weights is None else (loss * weights).sum()).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_matches_float64_reference(impl, reduction, force_impl):
    h, w, b, labels = make_inputs()
    weights = torch.rand(labels.shape) if reduction == "none" else None
    with force_impl(impl):
        loss, grads = grads_of(
            lambda h, w, b: fastunlearn.fused_linear_ihl(h, w, labels, b, reduction=reduction, chunk_rows=4),
            (h, w, b), weights,
        )  # fmt: skip
    ref_loss, ref_grads = grads_of(
        lambda h, w, b: ihl_reference(h @ w.T + b, labels, reduction=reduction),
        (h.double(), w.double(), b.double()), None if weights is None else weights.double(),
    )  # fmt: skip
    assert_close_verbose(loss, ref_loss, 1e-5, 1e-5, "loss")
    for name, g, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close_verbose(g, ref, 1e-6 * ref.abs().max().item() + 1e-7, 1e-4, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_matches_unfused_path(dtype):
    h, w, _, labels = make_inputs(n_rows=9, hidden=32, n_classes=70, dtype=dtype, bias=False)
    h = h.view(3, 3, 32)
    labels = labels.view(3, 3)
    loss, grads = grads_of(lambda h, w: fastunlearn.fused_linear_ihl(h, w, labels, chunk_rows=2), (h, w))
    ref_loss, ref_grads = grads_of(lambda h, w: fastunlearn.ihl_loss(h @ w.T, labels), (h, w))
    assert_close_verbose(loss, ref_loss, 1e-3, 1e-3, "loss")
    for g, ref, t in zip(grads, ref_grads, (h, w)):
        assert g.dtype == dtype and g.shape == t.shape
        assert_close_verbose(g, ref, 2e-2 * ref.abs().max().item(), 2e-2, "grad")


def test_no_grad_inputs_and_frozen_weight():
    h, w, b, labels = make_inputs()
    loss = fastunlearn.fused_linear_ihl(h, w, labels, b)  # nothing requires grad
    assert loss.requires_grad is False
    expected = fastunlearn.ihl_loss(h @ w.T + b, labels)
    assert_close_verbose(loss, expected, 1e-6, 1e-6, "loss without grad")
    hh = h.clone().requires_grad_(True)
    fastunlearn.fused_linear_ihl(hh, w, labels, b).backward()  # frozen LM head: only hidden's grad
    assert hh.grad is not None and torch.isfinite(hh.grad).all()


def test_all_ignored_gives_zero_and_zero_gradients():
    h, w, b, labels = make_inputs()
    labels[:] = -100
    loss, grads = grads_of(lambda h, w, b: fastunlearn.fused_linear_ihl(h, w, labels, b), (h, w, b))
    assert loss.item() == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_module_wrapper():
    h, w, b, labels = make_inputs()
    module = fastunlearn.FusedLinearIHL(reduction="sum", chunk_rows=3)
    assert torch.allclose(module(h, w, labels, b), fastunlearn.fused_linear_ihl(h, w, labels, b, reduction="sum"))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, w, b, y: (h, w[:, :5], b, y), ValueError, "weight must have shape"),
        (lambda h, w, b, y: (h, w.double(), b, y), TypeError, "weight must be float32"),
        (lambda h, w, b, y: (h, w.half(), b, y), TypeError, "weight has dtype"),
        (lambda h, w, b, y: (h, w, b[:3], y), ValueError, "bias must have shape"),
        (lambda h, w, b, y: (h, w, b, y[:3]), ValueError, "labels has shape"),
        (lambda h, w, b, y: (h, w, b, y + 1000), ValueError, "labels contains"),
        (lambda h, w, b, y: (h.int(), w, b, y), TypeError, "hidden must be float32"),
    ],
)
def test_bad_input_names_the_argument(mutate, error, match):
    h, w, b, y = mutate(*make_inputs())
    with pytest.raises(error, match=match):
        fastunlearn.fused_linear_ihl(h, w, y, b)


def test_bad_chunk_rows():
    h, w, b, y = make_inputs()
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        fastunlearn.fused_linear_ihl(h, w, y, b, chunk_rows=0)


def test_bfloat16_weight_gradient_is_accumulated_in_float32():
    """Many chunks of bf16 rows: grad_W is the correctly rounded sum of every row's dZ^T h (no chunk's product
    is rounded to bf16 before the sum). Logits are exact in bf16, so the rows' dZ equal those of the unfused loss."""
    n_rows, hidden, n_classes = 256, 16, 50
    h = torch.randint(-1, 2, (n_rows, hidden)).to(torch.bfloat16)
    w = (torch.randint(-4, 5, (n_classes, hidden)) / 8).to(torch.bfloat16)  # |logits| <= 8 in steps of 1/8
    labels = torch.randint(0, n_classes, (n_rows,))
    _, (_, grad_w) = grads_of(
        lambda h, w: fastunlearn.fused_linear_ihl(h, w, labels, reduction="sum", chunk_rows=16), (h, w)
    )
    z = (h @ w.T).requires_grad_(True)  # (N, V), exact
    fastunlearn.ihl_loss(z, labels, reduction="sum").backward()
    exact = z.grad.double().T @ h.double()  # (V, H) float64 sum of the same bf16 dZ rows
    half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=2**-100))) - 8)  # bf16: 8 significant bits
    float32_sums = 2.0**-20 * (z.grad.double().abs().T @ h.double().abs())  # any float32 summation order
    err = (grad_w.double() - exact).abs()
    assert bool((err <= half_ulp * 1.01 + float32_sums).all()), (
        f"max error {(err / half_ulp).max().item():.2f} half-ulps"
    )
