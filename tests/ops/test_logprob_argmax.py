"""The evaluation row op "log p(y) + argmax" (registry op ``logprob_argmax``) on every backend: log p against
float64 with per-dtype tolerances, the argmax exactly (ties to the lowest index, built exactly), ignored labels,
odd shapes, a vocabulary over 65536, extreme and non-finite rows, the chunked fused-linear form, no-gradient
refusal and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastunlearn.ops import dispatch
from fastunlearn.ops.logprob import fused_linear_logprob_argmax, token_logprob_argmax
from tests.helpers.backends import IMPL_PARAMS
from tests.helpers.reference import assert_close_verbose

IMPLS = [p for p in IMPL_PARAMS if p.values[0] in dispatch.OPS["logprob_argmax"].backends]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLT_MAX = torch.finfo(torch.float32).max


def reference_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """(log softmax(logits)[label] float64, first argmax), 0 and -1 at ignored rows; from the logits as given."""
    z = logits.double()
    valid = labels != ignore_index
    logp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0]
    return torch.where(valid, logp, 0.0), torch.where(valid, z.argmax(-1), -1)  # argmax: the first maximum


def backend_rows(impl: str, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    return dispatch.implementation("logprob_argmax", impl)(logits, labels, ignore_index)


def check_rows(impl, logits, labels, atol=1e-5, rtol=1e-6):
    logp, argmax = backend_rows(impl, logits, labels)
    want_logp, want_argmax = reference_rows(logits, labels)
    assert logp.dtype == torch.float32 and argmax.dtype == torch.int64
    assert logp.shape == argmax.shape == labels.shape
    assert_close_verbose(logp, want_logp, atol, rtol, "logp")
    assert torch.equal(argmax, want_argmax), (argmax, want_argmax)
    return logp, argmax


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_match_float64(impl, dtype):
    """The logits as stored in ``dtype`` (exactly representable in float32): log p to float32 rounding, the
    argmax exactly; ignored rows (0, -1)."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(13, 257, generator=gen) * 5).to(dtype)
    labels = torch.randint(0, 257, (13,), generator=gen)
    labels[[2, 7]] = -100
    labels[3] = int(logits[3].float().argmax())  # the label is the greedy token
    logp, argmax = check_rows(impl, logits, labels)
    assert torch.equal(logp[[2, 7]], torch.zeros(2)) and torch.equal(argmax[[2, 7]], torch.tensor([-1, -1]))


def tie_rows(n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose maximum is held exactly by several indices: in one block, across blocks and lanes, everywhere."""
    z = torch.randn(6, n_classes, generator=torch.Generator().manual_seed(2))
    z[0, [5, 6]] = 9.0  # neighbours
    z[1, [3, n_classes - 1]] = 9.0  # first and last block
    z[2, [700, 1000 % n_classes, 700 + 16]] = 9.0  # later indices, same SIMD lane / Triton lane on small blocks
    z[3] = 0.5  # every index ties: argmax 0
    z[4, [n_classes - 2, n_classes - 1]] = 9.0  # at the end only
    z[5, [0, 64, 128]] = 9.0  # the first index
    return z, torch.tensor([5, 0, 1, 2, 3, -100])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_the_lowest_index(impl, dtype):
    z, labels = tie_rows(1100)
    z = z.to(dtype)
    _, argmax = check_rows(impl, z, labels)
    assert argmax.tolist() == [5, 3, 700, 0, 1098, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_made_by_rounding_to_bfloat16(impl):
    """Logits distinct in float32 but equal in bfloat16 tie in the bfloat16 tensor: the first one wins."""
    z = torch.zeros(1, 40)
    z[0, 10], z[0, 30] = 8.01, 8.0  # both round to 8.0 in bfloat16
    zb = z.bfloat16()
    assert zb[0, 10] == zb[0, 30]
    assert backend_rows(impl, zb, torch.tensor([1]))[1].item() == 10


@pytest.mark.parametrize("impl", IMPLS)
def test_triton_blocks_and_csrc_threads(impl):
    """Rows longer than one Triton block (a small block_v: several loop steps and lanes) and than one C++ block,
    with enough rows that the C++ kernel splits them over threads."""
    z, labels = tie_rows(1100)
    z = torch.cat([z, torch.randn(58, 1100) * 3])
    labels = torch.cat([labels, torch.randint(0, 1100, (58,))])
    if impl == "triton":
        from fastunlearn.kernels.logprob import logprob_argmax_forward

        logp, argmax = logprob_argmax_forward(z, labels, -100, block_v=64, num_warps=1)
    else:
        logp, argmax = backend_rows(impl, z, labels)
    want_logp, want_argmax = reference_rows(z, labels)
    assert_close_verbose(logp, want_logp, 1e-5, 1e-6, "logp")
    assert torch.equal(argmax, want_argmax)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_over_65536(impl):
    z = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(3))
    z[0, 70_000] = 10.0
    z[1, [65_536, 65_537]] = 10.0
    z[2, 65_535] = 10.0
    labels = torch.tensor([70_000, 1, 65_536])
    _, argmax = check_rows(impl, z, labels, atol=2e-5)
    assert argmax.tolist() == [70_000, 65_536, 65_535]


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_and_non_finite_rows(impl):
    """+-1e4 logits, -inf entries and the lowest float give exact finite rows; a row whose log-sum-exp is not
    finite (all -inf, a NaN, a +inf) gives (NaN, -1)."""
    z = torch.randn(10, 50, generator=torch.Generator().manual_seed(4)) * 3
    z[0] = 1e4
    z[0, 2] = -1e4  # the label far below the rest
    z[1, 5] = 1e4  # the label dominates
    z[2, 3:] = float("-inf")  # -inf away from the label
    z[3, 7] = float("-inf")  # -inf at the label: log p = -inf, the argmax still defined
    z[4] = -FLT_MAX  # every entry the lowest float: a tie everywhere
    z[5] = float("-inf")
    z[6, 11] = float("nan")
    z[7, 12] = float("inf")
    z[8] = float("nan")  # ignored: (0, -1) whatever the logits hold
    z[9, :40] = float("-inf")  # the maximum in the last entries
    labels = torch.tensor([2, 5, 1, 7, 3, 0, 0, 0, -100, 45])
    logp, argmax = backend_rows(impl, z, labels)
    finite = [0, 1, 2, 4, 9]
    want_logp, want_argmax = reference_rows(z, labels)
    assert_close_verbose(logp[finite], want_logp[finite], 1e-5, 1e-6, "logp")
    assert torch.equal(argmax[finite], want_argmax[finite])
    assert logp[3] == float("-inf") and argmax[3] == want_argmax[3]
    assert argmax[4] == 0 and logp[4].item() == pytest.approx(-torch.log(torch.tensor(50.0)).item(), abs=1e-6)
    assert torch.isnan(logp[[5, 6, 7]]).all() and argmax[[5, 6, 7]].tolist() == [-1, -1, -1]
    assert logp[8] == 0 and argmax[8] == -1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1,), (2, 3), (3, 1, 4), (1, 1, 1)], ids=str)
def test_token_logprob_argmax_odd_shapes(impl, shape):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(*shape, 19, generator=gen) * 4
    labels = torch.randint(0, 19, shape, generator=gen)
    if labels.numel():
        labels.view(-1)[0] = -100
    logp, argmax = token_logprob_argmax(logits, labels, impl=impl)
    want_logp, want_argmax = reference_rows(logits, labels)
    assert logp.shape == argmax.shape == labels.shape
    assert_close_verbose(logp, want_logp, 1e-5, 1e-6, "logp")
    assert torch.equal(argmax, want_argmax)


def test_token_logprob_argmax_strided_logits_and_another_ignore_index():
    logits = torch.randn(4, 30).t()  # (30, 4): last-dim stride 30
    labels = torch.tensor([0, 7] * 15)
    logp, argmax = token_logprob_argmax(logits, labels, ignore_index=7)
    want_logp, want_argmax = reference_rows(logits, labels, ignore_index=7)
    assert_close_verbose(logp, want_logp, 1e-5, 1e-6, "logp")
    assert torch.equal(argmax, want_argmax)


def linear_inputs(n_rows, hidden, n_classes, dtype=torch.float32, bias=True, seed=6):
    """Inputs whose logits keep a top-2 gap far above their rounding (bfloat16 logits near 16: 1/16), so the argmax
    cannot depend on it: each row of hidden is pushed toward its greedy class until the gap is over 0.25."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, hidden, generator=gen)
    w = torch.randn(n_classes, hidden, generator=gen) / hidden**0.5
    b = torch.randn(n_classes, generator=gen) if bias else None
    labels = torch.randint(0, n_classes, (n_rows,), generator=gen)
    labels[::5] = -100
    for _ in range(20):
        h, w, b = (None if t is None else t.to(dtype) for t in (h, w, b))
        top2 = F.linear(h.double(), w.double(), None if b is None else b.double()).topk(2, -1)
        small = (top2.values[:, 0] - top2.values[:, 1]) <= 0.25
        if not small.any():
            return h, w, b, labels
        h = h.float() + 2 * small[:, None] * w.float()[top2.indices[:, 0]]
    raise AssertionError("no top-2 gap")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_matches_float64(impl, dtype, bias):
    h, w, b, labels = linear_inputs(23, 16, 301, dtype, bias)
    logp, argmax = fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=7, impl=impl)
    z = F.linear(h.double(), w.double(), None if b is None else b.double())
    want_logp, want_argmax = reference_rows(z, labels)
    # float32 logits are exact to ~1e-6; bfloat16 / float16 logits are rounded to the input dtype
    atol = {torch.float32: 2e-5, torch.bfloat16: 0.25, torch.float16: 3e-2}[dtype]
    assert_close_verbose(logp, want_logp, atol, 1e-5, "logp")
    assert torch.equal(argmax, want_argmax)
    # against the same rounded logits, every dtype: float32 rounding only
    ref_logp, ref_argmax = reference_rows(F.linear(h, w, b), labels)
    assert_close_verbose(logp, ref_logp, 2e-5, 1e-6, "logp (rounded logits)")
    assert torch.equal(argmax, ref_argmax)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "chunk_rows"), [((1,), 1), ((2, 3), 1), ((5,), 100), ((2, 7), 3), ((3, 1, 4), None)])
def test_fused_linear_odd_shapes_and_chunkings(impl, shape, chunk_rows):
    n = int(torch.tensor(shape).prod())
    h, w, b, labels = linear_inputs(n, 5, 13, seed=n)
    logp, argmax = fused_linear_logprob_argmax(h.view(*shape, 5), w, labels.view(shape), b, chunk_rows=chunk_rows,
                                               impl=impl)  # fmt: skip
    want_logp, want_argmax = reference_rows(F.linear(h.double(), w.double(), b.double()), labels)
    assert logp.shape == argmax.shape == shape
    assert_close_verbose(logp.flatten(), want_logp, 2e-5, 1e-6, "logp")
    assert torch.equal(argmax.flatten(), want_argmax)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_vocabulary_over_65536(impl):
    h, w, b, labels = linear_inputs(3, 8, 70_001, seed=7)
    w[[70_000, 65_536]] = 2 * h[:2]  # the greedy tokens of rows 0 and 1 above 65535 (logits near 2 |h|^2 = 16)
    labels[:] = torch.tensor([70_000, 65_536, -100])
    logp, argmax = fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=2, impl=impl)
    z = F.linear(h.double(), w.double(), b.double())
    assert (z.topk(2, -1).values.diff(dim=-1) < -0.25).all()
    want_logp, want_argmax = reference_rows(z, labels)
    assert_close_verbose(logp, want_logp, 3e-5, 1e-6, "logp")
    assert torch.equal(argmax, want_argmax) and argmax[:2].tolist() == [70_000, 65_536]


def test_never_more_than_chunk_rows_of_logits(monkeypatch):
    import fastunlearn.ops.reference.logprob as backend

    seen = []
    original = backend.logprob_argmax_forward

    def spy(logits, labels, ignore_index):
        seen.append(tuple(logits.shape))
        return original(logits, labels, ignore_index)

    monkeypatch.setattr(backend, "logprob_argmax_forward", spy)
    h, w, b, labels = linear_inputs(10, 16, 37)
    fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=3, impl="torch")
    assert seen == [(3, 37), (3, 37), (3, 37), (1, 37)]


def test_no_gradient_inputs_are_refused_while_autograd_is_on():
    h, w, b, labels = linear_inputs(4, 8, 11)
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="weight requires grad, but log p \\+ argmax is an evaluation op"):
        fused_linear_logprob_argmax(h, w, labels, b)
    with pytest.raises(ValueError, match="logits requires grad"):
        token_logprob_argmax(torch.randn(4, 11, requires_grad=True), labels)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            logp, argmax = fused_linear_logprob_argmax(h, w, labels, b)
        assert not logp.requires_grad and argmax.dtype == torch.int64


def test_bad_input_names_the_argument():
    h, w, b, labels = linear_inputs(4, 8, 11)
    with pytest.raises(ValueError, match=r"labels contains 11, outside \[0, 11\)"):
        fused_linear_logprob_argmax(h, w, labels.masked_fill(labels >= 0, 11), b)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but hidden has"):
        fused_linear_logprob_argmax(h, w.half(), labels, b)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=0)
    with pytest.raises(ValueError, match="logits must have at least 2 classes"):
        token_logprob_argmax(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        token_logprob_argmax(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\) but logits"):
        token_logprob_argmax(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels is empty"):
        token_logprob_argmax(torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprob_argmax(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), impl="cuda")


def test_dispatch_prefers_the_cpu_kernels():
    assert dispatch.select("logprob_argmax", torch.device("cpu")) == ("csrc" if dispatch.has_csrc() else "torch")
    assert dispatch.select("logprob_argmax", torch.device("cpu"), (torch.float64,), impl="torch") == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_triton_matches_the_torch_path_at_a_real_vocabulary(dtype):
    h, w, b, labels = linear_inputs(300, 64, 128_256, dtype, seed=8)
    h, w, b, labels = (t.cuda() for t in (h, w, b, labels))
    got = fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=128, impl="triton")
    want = fused_linear_logprob_argmax(h, w, labels, b, chunk_rows=128, impl="torch")
    assert_close_verbose(got[0], want[0], 1e-4, 1e-5, "logp")
    assert torch.equal(got[1], want[1])
