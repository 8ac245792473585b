"""The plain-PyTorch backends of the per-token log-probability ops (registry ops ``logprob`` and, for evaluation,
``logprob_argmax``), and the full-logits reference the tests check every path against.

Row convention (one chunk of rows): logits (C, V) in any float dtype, labels (C,) int64 with ``ignore_index``
rows. Statistics (C, 2) float32: m_i = max_v z_iv and s_i = log sum_v exp(z_iv - m_i), so that
logp_i = (z_{i,y_i} - m_i) - s_i (0 at ignored rows) and softmax(z_i) = exp((z_i - m_i) - s_i). Keeping m and s
apart (instead of lse = m + s) avoids rounding lse at the logits' magnitude: with |z| ~ 1e4 one float32 ulp of
lse is ~1e-3, which would shift every log-probability and softmax entry by that much.

Gradient of logp_i with respect to the row's logits z_i (V,):

    d logp_i / d z_iv = d z_{i,y_i} / d z_iv - d lse_i / d z_iv = 1[v = y_i] - exp(z_iv - lse_i)
                      = onehot(y_i)_v - softmax(z_i)_v

so with the incoming gradient g_i of logp_i, dL/dz_i = g_i (onehot(y_i) - softmax(z_i)), and 0 at ignored rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def logprob_forward(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(logp (C,), stats (C, 2) = [m, s]) in float32 of ``logits`` (C, V) against ``labels`` (C,); logp 0 at
    ignored rows. A float32 ``logits`` is overwritten (its buffer holds exp(z - m) after): the caller's chunk."""
    z = logits.float()  # (C, V): the chunk itself when float32, else one float32 copy
    valid = labels != ignore_index
    picked = z.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)  # z_{i, y_i}, before z is overwritten
    m = z.amax(dim=1)  # (C,)
    s = z.sub_(m[:, None]).exp_().sum(dim=1).log_()  # (C,)
    return torch.where(valid, (picked - m) - s, 0.0), torch.stack([m, s], dim=1)


def logprob_backward(grad_rows: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, ignore_index: int) -> Tensor:
    """dz (C, V) float32 = g_i (onehot(y_i) - softmax(z_i)) with g = ``grad_rows`` (C,) and ``stats`` from
    :func:`logprob_forward`; 0 at ignored rows (whatever their logits hold, NaN included). Written over a float32
    ``logits`` (returned as dz), else into one float32 copy."""
    valid = labels != ignore_index
    g = torch.where(valid, grad_rows.float(), 0.0)  # (C,)
    dz = logits.float().sub_(stats[:, :1]).sub_(stats[:, 1:]).exp_()  # softmax (C, V), in place
    dz.mul_(-g[:, None])
    dz.scatter_add_(1, torch.where(valid, labels, 0)[:, None], g[:, None])
    return dz.masked_fill_(~valid[:, None], 0.0)


def logprob_argmax_forward(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(logp (C,) float32, argmax (C,) int64) of ``logits`` (C, V) against ``labels`` (C,), without a gradient:
    logp as :func:`logprob_forward`, argmax = the first index of the row's maximum (``torch.max`` returns the
    first one). Ignored rows: logp 0, argmax -1; rows whose log-sum-exp is not finite (NaN, +inf or all -inf
    logits): logp NaN, argmax -1. ``logits`` is not written (one float32 temporary of its shape)."""
    z = logits.float()  # (C, V): the chunk itself when float32, else one float32 copy (exact: argmax unchanged)
    valid = labels != ignore_index
    m, argmax = z.max(dim=1)  # (C,), (C,): the first index on ties; NaN rows give m NaN
    picked = z.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)  # z_{i, y_i}
    s = (z - m[:, None]).exp_().sum(dim=1).log_()  # (C,)
    finite = torch.isfinite(m + s)
    logp = torch.where(valid, torch.where(finite, (picked - m) - s, float("nan")), 0.0)
    return logp, torch.where(valid & finite, argmax, -1)


def logprob_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Per-token log p(y) through the full (N, V) logits, differentiable by autograd (float64 in the tests):
    hidden (..., H), weight (V, H), labels (...) -> (...) in hidden's dtype (float32 at least), 0 at ignored."""
    logits = F.linear(hidden, weight, bias)  # (..., V)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)
