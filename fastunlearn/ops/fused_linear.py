"""IHL straight from the last hidden states and the LM head, never holding the full (N, V) logits.

Rows are processed in chunks: logits_c = h_c Wᵀ + b (C, V) -> IHL row statistics -> gradient written in
place over logits_c (the dispatch picks the Triton, C++ or torch backend) -> grad_h_c = dZ_c W and
grad_W += dZ_cᵀ h_c, accumulated in float32 with ``addmm`` (each chunk's product is never rounded to a half
dtype; Liger's fused linear cross-entropy does the same). Peak extra memory: one (C, V) chunk (plus its float32
copy for bfloat16 / float16 inputs, which the float32 accumulation needs) and the gradients.

For ``mean`` / ``sum`` the gradients are formed during the forward (3 GEMMs in all) and scaled by the
incoming grad_output in backward, on the device. For ``none`` the per-token grad_output is only known
in backward, which then recomputes the chunk logits (4 GEMMs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops import dispatch
from fastunlearn.ops.ihl import HingeOptions, backend, count_valid, flatten_labels, reduce_rows, run_backward
from fastunlearn.utils import validate

_DEFAULT_CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(n_classes: int, element_size: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return chunk_rows
    return max(1, _DEFAULT_CHUNK_BYTES // (n_classes * element_size))


def _chunked_pass(hidden, weight, bias, labels, grad_rows, ignore_index, margin, step, grads_for, impl):
    """Loss per row, and, when ``grad_rows`` is given, the gradients named in ``grads_for``.

    hidden (N, H), weight (V, H), bias (V,) or None, labels (N,), grad_rows (N,) float32 or None.
    """
    n_rows = hidden.shape[0]
    ops = backend(impl)
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    want_h, want_w, want_b = grads_for if grad_rows is not None else (False, False, False)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        h = hidden[rows]  # (C, H)
        z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V)
        loss[rows], stats, runner = ops.ihl_forward(z, labels[rows], ignore_index, margin)
        if grad_rows is None:
            continue
        dz = run_backward(impl, grad_rows[rows], z, labels[rows], stats, runner, ignore_index, margin, z)
        if want_h:
            torch.mm(dz, weight, out=grad_h[rows])  # (C, H)
        if want_w:  # (V, H) += (V, C) @ (C, H) in float32
            grad_w.addmm_(dz.t().float(), h.float())
        if want_b:
            grad_b += dz.sum(0, dtype=torch.float32)
    return loss, grad_h, grad_w, grad_b


def check_linear_inputs(hidden, weight, labels, bias, chunk_rows) -> None:
    """The inputs of a fused linear op: hidden (..., H), weight (V, H) with V >= 2, bias (V,) or None of
    hidden's dtype and device, labels (...) aligned with hidden, chunk_rows >= 1 or None."""
    validate.check_float_tensor("hidden", hidden)
    validate.check_float_tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have at least 2 rows (classes), got {weight.shape[0]}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    validate.check_labels(labels, hidden.shape[:-1], hidden.device, "hidden (..., H)")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


class _FusedLinearIHL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, margin, reduction, step, impl):
        grads_for = tuple(ctx.needs_input_grad[:3])
        ctx.options = (ignore_index, margin, reduction, step, grads_for, impl)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":  # per-token grad_output: gradients are formed in backward
            ctx.save_for_backward(hidden, weight, bias, labels)
            return _chunked_pass(hidden, weight, bias, labels, None, ignore_index, margin, step, grads_for, impl)[0]
        # mean / sum: every row's grad_output is the same scalar, applied in backward.
        ones = torch.ones((), dtype=torch.float32, device=hidden.device).expand(hidden.shape[0])  # (N,)
        loss, *grads = _chunked_pass(hidden, weight, bias, labels, ones, ignore_index, margin, step, grads_for, impl)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, margin, reduction, step, grads_for, impl = ctx.options
        if reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            grads = _chunked_pass(
                hidden, weight, bias, labels, grad_loss.float(), ignore_index, margin, step, grads_for, impl
            )[1:]
        else:
            g = grad_loss[0]  # 0-dim view of the uniform row gradient: no host synchronization
            grads, ctx.grads = [None if t is None else t * g for t in ctx.grads], None
        grads = [None if t is None else t.to(dtype) for t, dtype in zip(grads, ctx.dtypes)]
        return *grads, None, None, None, None, None, None


def fused_linear_ihl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
    chunk_rows: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """IHL of ``hidden @ weight.T + bias`` against ``labels`` without materializing the logits.

    hidden (..., H), weight (V, H) (an LM head's weight), bias (V,) or None, labels (...) int. Same
    semantics and return value as :func:`fastunlearn.ihl_loss`; gradients flow to hidden, weight and bias.
    ``chunk_rows`` sets the rows per chunk (default: chunks of about 256 MiB of logits). ``impl``: the IHL
    implementation, as in :func:`fastunlearn.ihl_loss`.
    """
    check_linear_inputs(hidden, weight, labels, bias, chunk_rows)
    validate.check_reduction_and_margin(reduction, margin)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = flatten_labels(labels)  # (N,)
    checks = validate.value_checks_enabled(h.device)
    if checks:
        validate.check_label_values(y, weight.shape[0], ignore_index)
    step = rows_per_chunk(weight.shape[0], hidden.element_size(), chunk_rows)
    impl = dispatch.select("ihl", h.device, impl=impl)
    loss_rows = _FusedLinearIHL.apply(h, weight, bias, y, int(ignore_index), float(margin), reduction, step, impl)
    if checks:
        validate.check_finite_rows(loss_rows, "hidden/weight (their logits)")
    return reduce_rows(loss_rows, count_valid(y, ignore_index), reduction, labels.shape)


class FusedLinearIHL(HingeOptions):
    """Module form of :func:`fused_linear_ihl`: ``FusedLinearIHL()(hidden, lm_head.weight, labels)``."""

    def __init__(
        self, ignore_index: int = -100, reduction: str = "mean", margin: float = 1.0, chunk_rows: int | None = None
    ) -> None:
        super().__init__(ignore_index, reduction, margin)
        self.chunk_rows = chunk_rows

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> Tensor:
        return fused_linear_ihl(
            hidden, weight, labels, bias, ignore_index=self.ignore_index, reduction=self.reduction,
            margin=self.margin, chunk_rows=self.chunk_rows,
        )  # fmt: skip
