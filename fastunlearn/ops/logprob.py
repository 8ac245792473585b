"""Per-token log-likelihood log p(y | context) of a language model's next tokens: the quantity NPO, SimNPO and
gradient ascent are built from (``fastunlearn.losses``).

- :func:`token_logprob`: from logits (..., V) a caller already has.
- :func:`fused_linear_logprob`: from the last hidden states and the LM head, never holding the (N, V) logits.
  Rows are processed in chunks: z_c = h_c Wᵀ + b (C, V) in the inputs' dtype, then in float32 the row max
  m_c and log-sum s_c = log sum exp(z_c - m_c), logp_c = (z_{c,y} - m_c) - s_c (``_logprob_torch`` derives
  the gradient). Only the (N, 2) float32 [m, s] is kept for backward, which recomputes each chunk's logits (the
  per-token grad_output is
  known only then) and forms dz_c = g_c (onehot(y_c) - softmax(z_c)) in float32, then
  grad_h_c = dz_c W and grad_W += dz_cᵀ h_c, grad_b += sum_c dz_c, accumulated in float32 with ``addmm``.
  The backend works in place on each chunk: peak extra memory is one (C, V) chunk (plus its float32 copy for
  bfloat16 / float16 inputs) and the gradients. 1 GEMM forward (the logits), 3 backward.

Both return float32 per-token values shaped like ``labels``, exactly 0 (with zero gradient) at ``ignore_index``.
Backends: the registry op ``logprob`` (``fastunlearn.ops.dispatch``): ``torch`` (chunked, any device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunlearn.ops import dispatch
from fastunlearn.ops.fused_linear import check_linear_inputs, rows_per_chunk
from fastunlearn.ops.ihl import flatten_labels
from fastunlearn.utils import validate


def token_logprob(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """log softmax(logits)[label] per token, float32, shaped like ``labels`` (0 at ``ignore_index``).

    logits (..., V) float, labels (...) int aligned with the logits (see :func:`fastunlearn.shift_causal`).
    """
    validate.check_float_tensor("logits", logits)
    validate.check_labels(labels, logits.shape[:-1], logits.device, "logits (..., V)")
    y = flatten_labels(labels)  # (N,)
    if validate.value_checks_enabled(logits.device):
        validate.check_label_values(y, logits.shape[-1], ignore_index)
    rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y, ignore_index=ignore_index,
                           reduction="none")  # fmt: skip
    return (-rows).view(labels.shape)


def _chunked_logprob(hidden, weight, bias, labels, ignore_index, step, ops) -> tuple[Tensor, Tensor]:
    """(logp (N,), stats (N, 2)) float32 of hidden (N, H) @ weight (V, H).T + bias, ``step`` rows at a time."""
    n_rows = hidden.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    stats = torch.empty((n_rows, 2), dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        h = hidden[rows]  # (C, H)
        z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V)
        logp[rows], stats[rows] = ops.logprob_forward(z, labels[rows], ignore_index)
    return logp, stats


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, step, impl):
        ops = dispatch.implementation("logprob", impl)
        logp, stats = _chunked_logprob(hidden, weight, bias, labels, ignore_index, step, ops)
        ctx.options = (ignore_index, step, impl, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(hidden, weight, bias, labels, stats)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        ignore_index, step, impl, (want_h, want_w, want_b) = ctx.options
        hidden, weight, bias, labels, stats = ctx.saved_tensors
        ops = dispatch.implementation("logprob", impl)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            h = hidden[rows]  # (C, H)
            z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V)
            dz = ops.logprob_backward(grad_logp[rows], z, labels[rows], stats[rows], ignore_index)  # (C, V) f32
            del z  # a float32 chunk is dz itself
            if want_h:
                torch.mm(dz.to(weight.dtype), weight, out=grad_h[rows])  # (C, H)
            if want_w:  # (V, H) += (V, C) @ (C, H) in float32
                grad_w.addmm_(dz.t(), h.float())
            if want_b:
                grad_b += dz.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """log p(label) under ``hidden @ weight.T + bias`` per token, without materializing the logits.

    hidden (..., H), weight (V, H) (an LM head's weight), bias (V,) or None, labels (...) int. Returns float32
    shaped like ``labels``: log softmax(hidden_i Wᵀ + b)[y_i], exactly 0 where ``labels == ignore_index``;
    gradients flow to hidden, weight and bias. ``chunk_rows``: rows per chunk (default: about 256 MiB of
    float32 logits). ``impl``: the backend (``dispatch`` rule; None: automatic).
    """
    check_linear_inputs(hidden, weight, labels, bias, chunk_rows)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = flatten_labels(labels)  # (N,)
    checks = validate.value_checks_enabled(h.device)
    if checks:
        validate.check_label_values(y, weight.shape[0], ignore_index)
    step = rows_per_chunk(weight.shape[0], 4, chunk_rows)  # the chunk's logits are float32
    impl = dispatch.select("logprob", h.device, (h.dtype,), impl=impl)
    logp = _FusedLinearLogprob.apply(h, weight, bias, y, int(ignore_index), step, impl)
    if checks:
        validate.check_finite_rows(logp, "hidden/weight (their logits)")
    return logp.view(labels.shape)
