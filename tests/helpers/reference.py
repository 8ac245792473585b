"""Float64 references written straight from the formulas, used by every backend's tests."""

from __future__ import annotations

import torch

import fastunlearn

CASES = ("random", "label_is_argmax", "ties", "extreme", "ignored")
# dtype: (loss atol, grad atol relative to the largest |grad|, grad rtol). bf16/fp16 gradients are
# rounded (the interpreter truncates) to the output dtype: 1 ulp of 2^-8 / 2^-11.
DTYPE_TOLERANCES = {
    torch.float32: (2e-6, 2e-6, 1e-5),
    torch.bfloat16: (2e-6, 2**-8, 2**-7),
    torch.float16: (2e-6, 2**-11, 2**-10),
}


def ihl_reference(logits, labels, ignore_index=-100, reduction="mean", margin=1.0, dtype=torch.float64):
    """max(0, margin + p_y - max_{v != y} p_v) computed in ``dtype``; runner-up ties -> lowest index."""
    z = logits.to(dtype)
    p = torch.softmax(z, dim=-1)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(-1)
    p_y = p.gather(-1, y).squeeze(-1)
    others = p.detach().scatter(-1, y, -1.0)
    r = others.argmax(dim=-1, keepdim=True)
    p_r = p.gather(-1, r).squeeze(-1)
    rows = torch.clamp(margin + p_y - p_r, min=0.0) * valid
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def assert_close_verbose(actual, expected, atol, rtol, what):
    """allclose that says where and by how much it differs."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    bad |= torch.isnan(actual) != torch.isnan(expected)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
            f"actual {actual[idx].item()!r} vs expected {expected[idx].item()!r}; max |diff| {diff.max().item():.3g}"
        )


def make_case(case: str, shape: tuple[int, ...], n_classes: int, dtype: torch.dtype, device="cpu"):
    """Logits (*shape, V) in ``dtype`` and labels (*shape) for one named edge case."""
    logits = torch.randn(*shape, n_classes) * 3
    labels = torch.randint(0, n_classes, shape)
    flat_z, flat_y = logits.view(-1, n_classes), labels.view(-1)
    if case == "label_is_argmax":
        flat_y.copy_(flat_z.argmax(-1))
        flat_y[::2] = flat_z[::2].argmin(-1)  # half not the argmax
    elif case == "ties":
        for i in range(flat_z.shape[0]):
            y, a, b, c = (torch.randperm(n_classes)[:4]).tolist()
            flat_y[i] = y
            flat_z[i, [a, b, c]] = 9.0  # a three-way tie for the runner-up
            if i % 2:
                flat_z[i, y] = 9.0  # and the label tied with them
    elif case == "extreme":
        flat_z[:, ::3] = -1e4
        flat_z[::2, 1::4] = 1e4
        flat_z[1::2, 2::5] = float("-inf")
        flat_y[1::2] = 0  # a finite logit (column 0 is -1e4)
    elif case == "ignored":
        flat_y[::3] = -100
    return logits.to(device=device, dtype=dtype), labels.to(device)


def run_loss(impl, force_impl, logits, labels, grad_weights=None, **kwargs):
    x = logits.clone().requires_grad_(True)
    with force_impl(impl):
        loss = fastunlearn.ihl_loss(x, labels, **kwargs)
    (loss if grad_weights is None else (loss * grad_weights).sum()).backward()
    return loss.detach(), x.grad


def reference_loss(logits, labels, grad_weights=None, dtype=torch.float64, **kwargs):
    x = logits.to(dtype).requires_grad_(True)
    loss = ihl_reference(x, labels, dtype=dtype, **kwargs)
    (loss if grad_weights is None else (loss * grad_weights.to(dtype)).sum()).backward()
    return loss.detach().double(), x.grad.double()


def check_against_reference(impl, force_impl, logits, labels, reduction="mean", **kwargs):
    """Tolerance: the dtype's, plus twice the error of the same formula evaluated in plain float32
    PyTorch (flash-attention's rule), which dominates for logits of magnitude 1e4."""
    loss_atol, grad_atol, grad_rtol = DTYPE_TOLERANCES[logits.dtype]
    weights = torch.randn(labels.shape, device=labels.device) if reduction == "none" else None
    loss, grad = run_loss(impl, force_impl, logits, labels, weights, reduction=reduction, **kwargs)
    ref_loss, ref_grad = reference_loss(logits, labels, weights, reduction=reduction, **kwargs)
    fp32_loss, fp32_grad = reference_loss(logits, labels, weights, torch.float32, reduction=reduction, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    loss_atol += 2 * (fp32_loss - ref_loss).abs().max().item()
    assert_close_verbose(loss, ref_loss, loss_atol, 1e-5, f"{impl} loss")
    grad_atol = grad_atol * ref_grad.abs().max().item() + 2 * (fp32_grad - ref_grad).abs().max().item()
    assert_close_verbose(grad, ref_grad, grad_atol, grad_rtol, f"{impl} grad")
