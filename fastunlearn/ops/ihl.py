"""Inverted Hinge Loss (Cha et al., arXiv 2408.06621): backends -> custom ops -> functional API -> module.

Per forget token with label y and p = softmax(logits) computed in float32:

    IHL = max(0, margin + p_y - max_{v != y} p_v)

It pushes the memorized token down and lifts only the runner-up, so unlike gradient ascent it is
bounded (in [0, 2] for margin 1). The runner-up is the lowest index among tied maxima.

Three backends share one signature (see ``fastunlearn.kernels.ihl`` for the math and row conventions):
``triton`` (CUDA, or CPU through TRITON_INTERPRET=1), ``csrc`` (C++ CPU kernels) and ``torch``
(chunked plain PyTorch). ``fastunlearn.ops.dispatch`` picks one per call. The two steps are registered as
``torch.library`` custom ops, so the loss works under ``torch.compile`` and CUDA graph capture: no host
synchronization happens on CUDA tensors (value checks are CPU-only by default, see ``validate``).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from fastunlearn.ops import dispatch
from fastunlearn.utils import validate


def backend(impl: str) -> types.ModuleType:
    """The module holding ``ihl_forward`` / ``ihl_backward`` for ``impl`` (the registry's ``ihl`` op)."""
    return dispatch.implementation("ihl", impl)


def run_backward(impl, grad_rows, logits, labels, stats, runner, ignore_index, margin, grad_out) -> Tensor:
    backend(impl).ihl_backward(grad_rows, logits, labels, stats, runner, ignore_index, margin, grad_out)
    return grad_out


# ---------------------------------------------------------------------------------------------------------
# Custom ops. Inputs: logits (N, V) with unit last-dim stride, labels (N,) int64 contiguous.
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastunlearn::ihl_forward", mutates_args=())
def _ihl_forward_op(
    logits: Tensor, labels: Tensor, ignore_index: int, margin: float, impl: str, inplace_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    loss, stats, runner = backend(impl).ihl_forward(logits, labels, ignore_index, margin)
    return loss, stats, runner


@_ihl_forward_op.register_fake
def _(logits, labels, ignore_index, margin, impl, inplace_grad):
    n_rows = logits.shape[0]
    loss = logits.new_empty(n_rows, dtype=torch.float32)
    stats = logits.new_empty((n_rows, 2), dtype=torch.float32)
    return loss, stats, logits.new_empty(n_rows, dtype=torch.int32)


@torch.library.custom_op("fastunlearn::ihl_backward", mutates_args=())
def _ihl_backward_op(
    grad_rows: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, runner: Tensor,
    ignore_index: int, margin: float, impl: str,
) -> Tensor:  # fmt: skip
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return run_backward(impl, grad_rows, logits, labels, stats, runner, ignore_index, margin, grad)


@_ihl_backward_op.register_fake
def _(grad_rows, logits, labels, stats, runner, ignore_index, margin, impl):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastunlearn::ihl_backward_", mutates_args=("logits",))
def _ihl_backward_inplace_op(
    grad_rows: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, runner: Tensor,
    ignore_index: int, margin: float, impl: str,
) -> None:  # fmt: skip
    run_backward(impl, grad_rows, logits, labels, stats, runner, ignore_index, margin, logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, margin, impl, inplace_grad = inputs
    _, stats, runner = output
    ctx.mark_non_differentiable(stats, runner)
    ctx.set_materialize_grads(False)  # no (N, 2) zero gradient for the statistics
    ctx.save_for_backward(logits, labels, stats, runner)
    ctx.options = (ignore_index, margin, impl, inplace_grad)


def _backward(ctx, grad_loss, grad_stats, grad_runner):
    logits, labels, stats, runner = ctx.saved_tensors
    ignore_index, margin, impl, inplace_grad = ctx.options
    if grad_loss is None:
        return None, None, None, None, None, None
    if inplace_grad:
        _ihl_backward_inplace_op(grad_loss, logits, labels, stats, runner, ignore_index, margin, impl)
        grad = logits
    else:
        grad = _ihl_backward_op(grad_loss, logits, labels, stats, runner, ignore_index, margin, impl)
    return grad, None, None, None, None, None


_ihl_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------
def count_valid(labels: Tensor, ignore_index: int) -> Tensor:
    """Non-ignored tokens, at least 1, as a device scalar (no host synchronization)."""
    return (labels != ignore_index).sum().clamp(min=1)


def reduce_rows(loss_rows: Tensor, n_valid: Tensor, reduction: str, shape) -> Tensor:
    """Reduce per-token losses (0 at ignored rows); ``mean`` divides by ``n_valid`` (see count_valid)."""
    if reduction == "none":
        return loss_rows.view(shape)
    total = loss_rows.sum()
    return total if reduction == "sum" else total / n_valid


def flatten_labels(labels: Tensor) -> Tensor:
    return labels.reshape(-1).to(torch.int64).contiguous()


def ihl_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
    inplace_grad: bool = False,
    impl: str | None = None,
) -> Tensor:
    """Inverted Hinge Loss of ``logits`` (..., V) against ``labels`` (...), aligned like ``F.cross_entropy``.

    Returns a float32 scalar (``mean``: over non-ignored tokens, 0 when all are ignored; ``sum``) or the
    per-token losses of shape ``labels.shape`` (``none``, 0 at ignored positions).

    ``inplace_grad=True`` writes the gradient into the logits buffer instead of a new (N, V) tensor,
    saving that memory. It is opt-in because the logits' values are destroyed during backward (the custom op
    declares the mutation, so autograd notices): another op that saved the same logits for its own backward
    (e.g. a second loss on them) then fails with autograd's "modified by an inplace operation" error, and
    logits that are a leaf tensor would receive themselves as ``.grad``. Use it when the logits come from an
    LM head and feed only this loss.

    ``impl``: "torch", "triton" or "csrc" runs that implementation (RuntimeError, naming it, when it cannot run
    here); None chooses per device (``fastunlearn.ops.dispatch``).
    """
    validate.check_float_tensor("logits", logits)
    n_classes = logits.shape[-1]
    if n_classes < 2:
        raise ValueError(f"logits must have at least 2 classes in its last dimension, got {n_classes}")
    validate.check_labels(labels, logits.shape[:-1], logits.device, "logits (..., V)")
    validate.check_reduction_and_margin(reduction, margin)

    z = logits.reshape(-1, n_classes)  # (N, V)
    if z.stride(-1) != 1:
        z = z.contiguous()
    y = flatten_labels(labels)  # (N,)
    checks = validate.value_checks_enabled(z.device)
    if checks:
        validate.check_label_values(y, n_classes, ignore_index)
    impl = dispatch.select("ihl", z.device, impl=impl)
    n_valid = count_valid(y, ignore_index)  # before the op: its bool temporary is gone by the op's peak
    loss_rows, _, _ = _ihl_forward_op(z, y, int(ignore_index), float(margin), impl, bool(inplace_grad))
    if checks:
        validate.check_finite_rows(loss_rows, "logits")
    return reduce_rows(loss_rows, n_valid, reduction, labels.shape)


class HingeOptions(nn.Module):
    """What the IHL modules share: ``ignore_index``, ``reduction`` and ``margin``, checked once."""

    def __init__(self, ignore_index: int, reduction: str, margin: float) -> None:
        super().__init__()
        validate.check_reduction_and_margin(reduction, margin)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.margin = margin

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, margin={self.margin}, ignore_index={self.ignore_index}"


class IHLLoss(HingeOptions):
    """Module form of :func:`ihl_loss`: ``IHLLoss(reduction="mean")(logits, labels)``."""

    def __init__(
        self, ignore_index: int = -100, reduction: str = "mean", margin: float = 1.0, inplace_grad: bool = False
    ) -> None:
        super().__init__(ignore_index, reduction, margin)
        self.inplace_grad = inplace_grad

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return ihl_loss(
            logits, labels, ignore_index=self.ignore_index, reduction=self.reduction,
            margin=self.margin, inplace_grad=self.inplace_grad,
        )  # fmt: skip
