"""Per-token log-likelihood log p(y | context) of a language model's next tokens: the quantity NPO, SimNPO and
gradient ascent are built from (``fastunlearn.losses``).

- :func:`token_logprob`: from logits (..., V) a caller already has.
- :func:`fused_linear_logprob`: from the last hidden states and the LM head, never holding the (N, V) logits.
  Rows are processed in chunks: z_c = h_c Wᵀ + b (C, V) in the inputs' dtype, then in float32 the row max
  m_c and log-sum s_c = log sum exp(z_c - m_c), logp_c = (z_{c,y} - m_c) - s_c (``ops.reference.logprob``
  derives the gradient). Only the (N, 2) float32 [m, s] is kept for backward, which recomputes each chunk's
  logits (the per-token grad_output is known only then) and forms dz_c = g_c (onehot(y_c) - softmax(z_c)) in
  float32, then grad_h_c = dz_c W and grad_W += dz_cᵀ h_c, grad_b += sum_c dz_c, accumulated in float32 with ``addmm``.
  The backend works in place on each chunk: peak extra memory is one (C, V) chunk (plus its float32 copy for
  bfloat16 / float16 inputs) and the gradients. 1 GEMM forward (the logits), 3 backward.

Both return float32 per-token values shaped like ``labels``, exactly 0 (with zero gradient) at ``ignore_index``.
Backends: the registry op ``logprob`` (``fastunlearn.ops.dispatch``): ``torch`` (chunked, any device).

For evaluation (no gradient), the same row pass also yields each row's argmax, the greedy token that memorization
accuracy compares with the target:

- :func:`token_logprob_argmax`: (logp, argmax) from logits.
- :func:`fused_linear_logprob_argmax`: (logp, argmax) from hidden states and the LM head, one (C, V) chunk of
  logits at a time (1 GEMM per chunk, then one pass over it: no log-softmax or float32 copy of the logits).

Their rows: logp as above; argmax (int64) = the lowest index of the row's maximum (``torch.argmax``'s tie rule),
-1 on ignored rows; a row whose log-sum-exp is not finite (NaN, +inf or all -inf logits) gives logp NaN and
argmax -1 (returned, not raised: a NaN perplexity stays visible, as through the logits). They have no gradient:
inputs that require one are refused while autograd is on (call them under ``torch.no_grad()`` or
``torch.inference_mode()``). Backends: the registry op ``logprob_argmax``: ``torch``, ``csrc`` (CPU), ``triton``.
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


def _refuse_grad(**tensors: Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but log p + argmax is an evaluation op without a gradient: call it under "
                f"torch.no_grad() or torch.inference_mode() (or use token_logprob / fused_linear_logprob to train)"
            )


def token_logprob_argmax(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, impl: str | None = None
) -> tuple[Tensor, Tensor]:
    """(log softmax(logits)[label] float32, argmax(logits) int64), both shaped like ``labels``, in one pass over
    each row (module docstring: ties, ignored and non-finite rows). No gradient.

    logits (..., V) float32 / bfloat16 / float16 with V >= 2, labels (...) int aligned with the logits.
    ``impl``: the backend of registry op ``logprob_argmax`` (None: automatic)."""
    validate.check_float_tensor("logits", logits)
    validate.check_labels(labels, logits.shape[:-1], logits.device, "logits (..., V)")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have at least 2 classes (last dim), got shape {tuple(logits.shape)}")
    _refuse_grad(logits=logits)
    z = logits.reshape(-1, logits.shape[-1])  # (N, V)
    z = z if z.stride(-1) == 1 else z.contiguous()
    y = flatten_labels(labels)  # (N,)
    if validate.value_checks_enabled(z.device):
        validate.check_label_values(y, z.shape[-1], ignore_index)
    impl = dispatch.select("logprob_argmax", z.device, (z.dtype,), impl=impl)
    with torch.no_grad():
        logp, argmax = dispatch.implementation("logprob_argmax", impl)(z, y, int(ignore_index))
    return logp.view(labels.shape), argmax.view(labels.shape)


def fused_linear_logprob_argmax(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p(label) float32, argmax int64) under ``hidden @ weight.T + bias`` per token, shaped like ``labels``,
    without materializing the logits; what :func:`token_logprob_argmax` gives on ``F.linear(hidden, weight,
    bias)`` (the same rounded logits, a chunk at a time). No gradient.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...) int. ``chunk_rows``: rows per chunk (default:
    about 256 MiB of float32 logits). ``impl``: the backend of registry op ``logprob_argmax`` (None: automatic).
    """
    check_linear_inputs(hidden, weight, labels, bias, chunk_rows)
    _refuse_grad(hidden=hidden, weight=weight, bias=bias)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = flatten_labels(labels)  # (N,)
    if validate.value_checks_enabled(h.device):
        validate.check_label_values(y, weight.shape[0], ignore_index)
    step = rows_per_chunk(weight.shape[0], 4, chunk_rows)
    impl = dispatch.select("logprob_argmax", h.device, (h.dtype,), impl=impl)
    row_op = dispatch.implementation("logprob_argmax", impl)
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    argmax = torch.empty(h.shape[0], dtype=torch.int64, device=h.device)
    with torch.no_grad():
        for start in range(0, h.shape[0], step):
            rows = slice(start, start + step)
            z = torch.addmm(bias, h[rows], weight.t()) if bias is not None else h[rows] @ weight.t()  # (C, V)
            logp[rows], argmax[rows] = row_op(z, y[rows], int(ignore_index))
            del z
    return logp.view(labels.shape), argmax.view(labels.shape)


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
