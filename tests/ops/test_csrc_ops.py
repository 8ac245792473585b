"""The C++ CPU kernels of fastunlearn._C (Inverted Hinge Loss) against a float64 reference."""

import math

import pytest
import torch

C = pytest.importorskip("fastunlearn._C")

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(logits, labels, ignore_index=IGNORE, margin=1.0, grad_rows=None):
    """float64 (loss, lse, runner, grad) straight from the formula; grad by autograd of reduction 'none'."""
    z = logits.detach().double().requires_grad_()
    n = z.shape[0]
    rows = torch.arange(n)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    p = torch.softmax(z, dim=-1)
    q = p.detach().clone()
    q[rows, y] = -1.0
    runner = q.argmax(dim=-1)  # first index on ties
    hinge = margin + p[rows, y] - p[rows, runner]
    loss = torch.where(valid & (hinge > 0), hinge, torch.zeros_like(hinge))
    g = torch.ones(n, dtype=torch.float64) if grad_rows is None else grad_rows.double()
    (grad,) = torch.autograd.grad(loss, z, g)
    lse = torch.where(valid, torch.logsumexp(z.detach(), dim=-1), torch.zeros(n, dtype=torch.float64))
    return loss.detach(), lse, torch.where(valid, runner, torch.full_like(runner, -1)), grad


def run(logits, labels, ignore_index=IGNORE, margin=1.0, grad_rows=None, grad_out=None):
    """(loss, lse = max + log-sum-exp from the stats, runner, grad)."""
    loss, stats, runner = C.ihl_forward(logits, labels, ignore_index, margin)
    assert stats.shape == (logits.shape[0], 2)
    if grad_rows is None:
        grad_rows = torch.ones(()).expand(logits.shape[0])
    if grad_out is None:
        grad_out = torch.full_like(logits, 7.0)  # every element must be overwritten
    C.ihl_backward(grad_rows, logits, labels, stats, runner, ignore_index, margin, grad_out)
    return loss, stats.sum(dim=1), runner, grad_out


def grad_tol(dtype, ref_grad, lse_err):
    """Output-dtype rounding, or the fp32 rounding of lse (it shifts every p by a factor exp(lse_err))."""
    scale = max(ref_grad.abs().max().item(), 1e-30)
    rel = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    rel = max(rel, 2 * lse_err)
    return dict(rtol=rel, atol=rel * scale)


def check_against_reference(logits, labels, margin=1.0, grad_rows=None, ignore_index=IGNORE):
    loss, lse, runner, grad = run(logits, labels, ignore_index, margin, grad_rows)
    r_loss, r_lse, r_runner, r_grad = reference(logits, labels, ignore_index, margin, grad_rows)
    assert loss.dtype == lse.dtype == torch.float32 and runner.dtype == torch.int32 and grad.dtype == logits.dtype
    # lse is fp32: with |lse| ~ 1e4 its rounding (an ulp ~ 1e-3) dominates the error of every p = exp(z - lse).
    lse_err = torch.finfo(torch.float32).eps * max(r_lse.abs().max().item(), 1.0) if len(r_lse) else 0.0
    tol = max(1e-5, 2 * lse_err)
    torch.testing.assert_close(loss.double(), r_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), r_lse, rtol=1e-6, atol=1e-5)
    assert torch.equal(runner.long(), r_runner)
    torch.testing.assert_close(grad.double(), r_grad, **grad_tol(logits.dtype, r_grad, lse_err))
    return loss, lse, runner, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [2, 37, 1000])
def test_matches_reference(dtype, V):
    gen = torch.Generator().manual_seed(V)
    n = 64
    logits = (3 * torch.randn(n, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::7] = IGNORE
    grad_rows = torch.rand(n, generator=gen) + 0.5
    check_against_reference(logits, labels, margin=1.0, grad_rows=grad_rows)
    check_against_reference(logits, labels, margin=0.3)  # some hinges inactive


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_over_65536(dtype):
    gen = torch.Generator().manual_seed(0)
    V = 70000  # long rows also check the fp32 accuracy of the sum of exponentials (lse within 1e-5)
    logits = (3 * torch.randn(6, V, generator=gen)).to(dtype)
    logits[0, 69999] = 20.0  # label at the tail
    logits[1, 68000] = 20.0  # runner-up beyond 65536
    labels = torch.tensor([69999, 5, IGNORE, 1, 2, 3])
    _, _, runner, _ = check_against_reference(logits, labels)
    assert runner[1].item() == 68000


def test_all_ignored_batch():
    logits = torch.randn(5, 11)
    labels = torch.full((5,), IGNORE)
    loss, lse, runner, grad = run(logits, labels, grad_rows=torch.rand(5))
    assert torch.equal(loss, torch.zeros(5)) and torch.equal(lse, torch.zeros(5))
    assert torch.equal(runner, torch.full((5,), -1, dtype=torch.int32))
    assert torch.equal(grad, torch.zeros_like(logits))


def test_empty_batch():
    loss, lse, runner, grad = run(torch.randn(0, 9), torch.zeros(0, dtype=torch.long))
    assert loss.shape == lse.shape == runner.shape == (0,) and grad.shape == (0, 9)


def test_label_is_argmax_and_not():
    logits = torch.tensor([[0.5, 4.0, 2.0, 1.0], [0.5, 4.0, 2.0, 1.0]])
    labels = torch.tensor([1, 2])  # row 0: label is the argmax; row 1: it is not
    _, _, runner, _ = check_against_reference(logits, labels)
    assert runner.tolist() == [2, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_runner_ties_lowest_index(dtype):
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0, 3.0],
            [1.0, 3.0, 3.0, 0.0, 3.0],
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [-math.inf, -math.inf, 5.0, -math.inf, -math.inf],  # every v != y is -inf
            [5.0, -math.inf, -math.inf, -math.inf, -math.inf],
        ]
    ).to(dtype)
    labels = torch.tensor([0, 1, 0, 3, 2, 0])
    _, _, runner, _ = check_against_reference(logits, labels)
    assert runner.tolist() == [1, 2, 1, 0, 0, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_neg_inf_logits(dtype):
    gen = torch.Generator().manual_seed(1)
    n, V = 16, 50
    logits = torch.randn(n, V, generator=gen)
    logits[:, 3] = 1e4
    logits[::2, 7] = 1e4 - 2  # near the max: a non-trivial softmax at 1e4
    logits[:, 10] = -1e4
    logits[:, 20:25] = -math.inf
    logits = logits.to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[0], labels[1], labels[2] = 3, 7, 22  # label at 1e4, near it, at -inf
    loss, lse, runner, grad = check_against_reference(logits, labels)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(grad).all()
    assert (runner >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strided_logits_and_grad_out(dtype):
    gen = torch.Generator().manual_seed(2)
    n, V = 12, 37
    wide = torch.randn(n, V + 13, generator=gen).to(dtype)
    logits = wide[:, 5 : 5 + V]
    assert not logits.is_contiguous() and logits.stride(1) == 1
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[4] = IGNORE
    loss, lse, runner, grad = check_against_reference(logits, labels)
    c_loss, c_lse, c_runner, c_grad = run(logits.contiguous(), labels)
    assert torch.equal(loss, c_loss) and torch.equal(lse, c_lse) and torch.equal(runner, c_runner)
    assert torch.equal(grad, c_grad)
    out_wide = torch.full((n, V + 4), 3.0, dtype=dtype)
    run(logits, labels, grad_out=out_wide[:, 2 : 2 + V])
    assert torch.equal(out_wide[:, 2 : 2 + V], c_grad)
    assert (out_wide[:, :2] == 3).all() and (out_wide[:, 2 + V :] == 3).all()  # nothing written outside


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_equals_out_of_place(dtype):
    gen = torch.Generator().manual_seed(3)
    n, V = 20, 37
    logits = (2 * torch.randn(n, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[3] = IGNORE
    labels[5] = V  # invalid
    grad_rows = torch.rand(n, generator=gen)
    _, _, _, grad = run(logits, labels, grad_rows=grad_rows)
    _, stats, runner = C.ihl_forward(logits, labels, IGNORE, 1.0)
    buf = logits.clone()
    C.ihl_backward(grad_rows, buf, labels, stats, runner, IGNORE, 1.0, buf)
    torch.testing.assert_close(buf, grad, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN row included


def test_grad_rows_any_stride():
    gen = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(6, 9, generator=gen), torch.randint(0, 9, (6,), generator=gen)
    _, _, _, g_expanded = run(logits, labels, grad_rows=torch.tensor(0.7).expand(6))
    _, _, _, g_full = run(logits, labels, grad_rows=torch.full((6,), 0.7))
    assert torch.equal(g_expanded, g_full)
    strided = torch.rand(12, generator=gen)[::2]
    _, _, _, g_strided = run(logits, labels, grad_rows=strided)
    _, _, _, g_contig = run(logits, labels, grad_rows=strided.contiguous())
    assert torch.equal(g_strided, g_contig)


@pytest.mark.parametrize("dtype", DTYPES)
def test_invalid_rows_are_nan(dtype):
    V = 8
    logits = torch.randn(7, V).to(dtype)
    logits[3, 2] = math.nan
    logits[4, 5] = math.inf
    logits[5] = -math.inf
    labels = torch.tensor([V, -5, 1, 1, 1, 1, IGNORE])  # 0, 1: bad labels; 3, 4, 5: bad logits
    loss, _, runner, grad = run(logits, labels)
    bad = [0, 1, 3, 4, 5]
    assert torch.isnan(loss[bad]).all() and (runner[bad] == -1).all()
    assert torch.isnan(grad[bad]).all()
    assert torch.isfinite(loss[2]) and runner[2] >= 0 and torch.isfinite(grad[2]).all()
    assert loss[6] == 0 and runner[6] == -1 and (grad[6] == 0).all()


def test_inactive_hinge_zero_grad():
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    loss, _, runner, grad = run(logits, torch.tensor([0]), margin=0.1)
    assert loss.item() == 0 and runner.item() == 1 and (grad == 0).all()


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_bad_forward_inputs():
    z, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    _raises("labels", C.ihl_forward, z, y.int(), IGNORE, 1.0)
    _raises("labels", C.ihl_forward, z, y[:3], IGNORE, 1.0)
    _raises("labels", C.ihl_forward, z, y.view(2, 2), IGNORE, 1.0)
    _raises("labels", C.ihl_forward, z, torch.randint(0, 6, (8,))[::2], IGNORE, 1.0)
    _raises("logits", C.ihl_forward, z.view(2, 2, 6), y, IGNORE, 1.0)
    _raises("logits", C.ihl_forward, torch.randn(4, 1), y, IGNORE, 1.0)
    _raises("logits", C.ihl_forward, z.double(), y, IGNORE, 1.0)
    _raises("logits", C.ihl_forward, z.long(), y, IGNORE, 1.0)
    _raises("logits", C.ihl_forward, torch.randn(6, 4).t(), y, IGNORE, 1.0)


def test_bad_backward_inputs():
    z, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    loss, stats, runner = C.ihl_forward(z, y, IGNORE, 1.0)
    g, out = torch.ones(4), torch.empty_like(z)

    def bwd(g=g, z=z, y=y, stats=stats, runner=runner, out=out):
        C.ihl_backward(g, z, y, stats, runner, IGNORE, 1.0, out)

    _raises("grad_rows", lambda: bwd(g=g.double()))
    _raises("grad_rows", lambda: bwd(g=torch.ones(5)))
    _raises("logits", lambda: bwd(z=torch.randn(4, 1), out=torch.empty(4, 1)))
    _raises("labels", lambda: bwd(y=y.int()))
    _raises("stats", lambda: bwd(stats=stats[:3]))
    _raises("stats", lambda: bwd(stats=stats[:, :1]))
    _raises("runner", lambda: bwd(runner=runner.long()))
    _raises("grad_out", lambda: bwd(out=out.half()))
    _raises("grad_out", lambda: bwd(out=torch.empty(4, 7)))
    _raises("grad_out", lambda: bwd(out=torch.empty(6, 4).t()))
