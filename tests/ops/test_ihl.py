"""ihl_loss on every backend against the float64 reference: values, gradients, edge cases."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree

import fastunlearn
from fastunlearn.ops import dispatch
from fastunlearn.ops.reference import ihl as _ihl_torch
from tests.helpers.backends import IMPL_PARAMS
from tests.helpers.reference import (
    CASES,
    DTYPE_TOLERANCES,
    assert_close_verbose,
    check_against_reference,
    ihl_reference,
    make_case,
    run_loss,
)

DTYPES = list(DTYPE_TOLERANCES)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_matches_float64_reference(impl, dtype, case, reduction, force_impl):
    logits, labels = make_case(case, (3, 5), 37, dtype)  # leading dims (B, T), odd V
    check_against_reference(impl, force_impl, logits, labels, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_vocabulary_above_65536(impl, dtype, force_impl):
    logits, labels = make_case("random", (3,), 70_001, dtype)
    labels[1] = logits[1].float().argmax()
    check_against_reference(impl, force_impl, logits, labels, "sum")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_margin_below_one_can_deactivate_the_hinge(impl, force_impl):
    logits = torch.zeros(4, 16)
    logits[:, 3] = 5.0  # p_3 ~ 0.9 > p_y + margin for y != 3: hinge inactive
    labels = torch.tensor([0, 3, 7, 3])
    loss, grad = run_loss(impl, force_impl, logits, labels, torch.ones(4), reduction="none", margin=0.3)
    assert loss[0] == 0 and loss[2] == 0 and loss[1] > 0 and loss[3] > 0
    assert grad[[0, 2]].abs().max() == 0
    check_against_reference(impl, force_impl, logits, labels, "mean", margin=0.3)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_all_ignored_gives_zero_loss_and_gradient(impl, force_impl):
    logits = torch.randn(2, 3, 11)
    labels = torch.full((2, 3), -100)
    for reduction in ("mean", "sum"):
        loss, grad = run_loss(impl, force_impl, logits, labels, reduction=reduction)
        assert loss.item() == 0.0
        assert torch.count_nonzero(grad) == 0 and not torch.isnan(grad).any()


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_custom_ignore_index_and_int32_labels(impl, force_impl):
    logits, labels = make_case("ignored", (6,), 13, torch.float32)
    labels = torch.where(labels == -100, 5, labels)
    labels[0] = 5
    check_against_reference(impl, force_impl, logits, labels.int(), ignore_index=5)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_runner_up_ties_go_to_lowest_index(impl, force_impl):
    logits = torch.zeros(2, 8)
    logits[0, [2, 5, 6]] = 4.0  # label 0: runner-up is 2
    logits[1, [1, 3]] = 4.0  # label 1 is tied with 3: runner-up is 3, not 1
    labels = torch.tensor([0, 1])
    _, grad = run_loss(impl, force_impl, logits, labels, reduction="sum")
    assert grad[0, 2] < grad[0, 5] == grad[0, 6]  # only index 2 gets the runner-up term
    assert grad[1, 3] < 0 < grad[1, 1]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_row_strided_and_non_contiguous_logits(impl, force_impl):
    wide = torch.randn(4, 6, 40)
    logits = wide[:, 1:5, 2:39]  # rows not contiguous, last dim contiguous
    labels = torch.randint(0, 37, (4, 4))
    check_against_reference(impl, force_impl, logits, labels)
    check_against_reference(impl, force_impl, wide.transpose(1, 2)[:, :6, :], torch.randint(0, 6, (4, 6)))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_inplace_gradient_equals_out_of_place(impl, force_impl):
    logits, labels = make_case("ignored", (4, 3), 29, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    z = leaf * 1.0  # a non-leaf, as an LM head's output
    with force_impl(impl):
        fastunlearn.ihl_loss(z, labels, inplace_grad=True).backward()
    _, expected = run_loss(impl, force_impl, logits, labels)
    assert_close_verbose(leaf.grad, expected, 0.0, 0.0, "in-place grad")
    assert_close_verbose(z.detach(), expected, 0.0, 0.0, "logits buffer holds the gradient")


def test_inplace_gradient_is_caught_when_logits_are_saved_elsewhere(force_impl):
    leaf = torch.randn(3, 9, requires_grad=True)
    z = leaf * 1.0
    other = (z**2).sum()  # saves z for its own backward, created before the IHL node
    loss = other + fastunlearn.ihl_loss(z, torch.tensor([1, 2, 3]), inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_path_chunks_give_the_same_result(monkeypatch, force_impl):
    logits, labels = make_case("ignored", (37,), 50, torch.float32)
    full = run_loss("torch", force_impl, logits, labels)
    monkeypatch.setenv("FASTUNLEARN_TORCH_CHUNK_MB", str(4 * 50 * 4 * 2 / 2**20))  # 4 rows per chunk
    assert _ihl_torch.chunk_rows(50) == 4
    chunked = run_loss("torch", force_impl, logits, labels)
    for a, b in zip(full, chunked):
        assert_close_verbose(a, b, 0.0, 0.0, "chunked torch path")


@pytest.mark.interpreter
@pytest.mark.skipif(not dispatch.triton_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_across_several_blocks(dtype):
    """Small blocks: the online log-sum-exp and the runner-up carried across loop iterations."""
    kernels = pytest.importorskip("fastunlearn.kernels.ihl")
    logits, labels = make_case("ties", (7,), 100, dtype)
    logits[0, 90:] = 20.0  # runner-up in the last block
    logits[1, :] = float("-inf")
    logits[1, 70] = 0.0  # first blocks all -inf
    labels[1] = 70
    expected = _ihl_torch.ihl_forward(logits, labels, -100, 1.0)
    got = kernels.ihl_forward(logits, labels, -100, 1.0, block_v=16)
    for name, a, b in zip(("loss", "stats", "runner"), got, expected):
        assert_close_verbose(a, b, 1e-6, 1e-6, f"triton {name}")
    g = torch.rand(7)
    grad = kernels.ihl_backward(g, logits, labels, *got[1:], -100, 1.0, torch.empty_like(logits), block_v=16)
    ref = _ihl_torch.ihl_backward(g, logits, labels, *expected[1:], -100, 1.0, torch.empty_like(logits))
    _, grad_atol, grad_rtol = DTYPE_TOLERANCES[dtype]
    assert_close_verbose(grad, ref, grad_atol * ref.abs().max().item(), grad_rtol, "triton grad")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_invalid_values_give_nan_when_checks_are_off(impl, force_impl, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CHECK_VALUES", "0")
    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    logits[3] = float("-inf")
    labels = torch.tensor([1, 99, 2, 4])
    loss, grad = run_loss(impl, force_impl, logits, labels, torch.ones(4), reduction="none")
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0])
    assert torch.isnan(grad[1:]).all() and torch.isfinite(grad[0]).all()


def test_loss_is_bounded_and_fp32_for_half_inputs():
    logits = (torch.randn(64, 50) * 20).to(torch.bfloat16)
    loss = fastunlearn.ihl_loss(logits, torch.randint(0, 50, (64,)), reduction="none")
    assert loss.dtype == torch.float32
    assert loss.min() >= 0 and loss.max() <= 2


def test_module_wrapper_matches_functional():
    logits, labels = make_case("ignored", (3, 4), 21, torch.float32)
    module = fastunlearn.IHLLoss(reduction="sum", margin=0.5)
    assert "margin=0.5" in repr(module)
    assert torch.equal(module(logits, labels), fastunlearn.ihl_loss(logits, labels, reduction="sum", margin=0.5))


def test_reference_gradcheck_float64():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100])
    assert torch.autograd.gradcheck(lambda z: ihl_reference(z, labels, reduction="sum"), (logits,))


class _PeakAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages created inside the block and still alive (a storage lives while any tensor
    on it does; views of an op's inputs allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[int, list[int]] = {}  # storage address -> [tensors alive on it, bytes]
        self.live = self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.owners[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.owners[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            address = t.untyped_storage().data_ptr()
            if address in inputs and address not in self.owners:
                continue  # a view of (or an in-place op on) memory from before the block
            entry = self.owners.setdefault(address, [0, t.untyped_storage().nbytes()])
            if entry[0] == 0:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, address)
        return out


def test_torch_path_temporaries_stay_within_the_chunk_budget(monkeypatch):
    """The (C, V) float32 temporaries of a chunk fit FASTUNLEARN_TORCH_CHUNK_MB (exp(z - m) made 3 of them)."""
    n_cols, rows_per_chunk = 1000, 8
    budget = _ihl_torch._TEMPS_PER_ELEMENT * 4 * n_cols * rows_per_chunk
    monkeypatch.setenv("FASTUNLEARN_TORCH_CHUNK_MB", str(budget / 2**20))
    assert _ihl_torch.chunk_rows(n_cols) == rows_per_chunk
    logits, labels = torch.randn(64, n_cols), torch.randint(0, n_cols, (64,))
    per_row = 64 * 64  # outputs and (C,) temporaries: a few dozen bytes per row
    with _PeakAllocations() as forward:
        loss, stats, runner = _ihl_torch.ihl_forward(logits, labels, -100, 1.0)
    assert forward.peak <= budget + per_row, forward.peak
    grad = torch.empty_like(logits)
    with _PeakAllocations() as backward:
        _ihl_torch.ihl_backward(torch.ones(64), logits, labels, stats, runner, -100, 1.0, grad)
    assert backward.peak <= budget + per_row, backward.peak
