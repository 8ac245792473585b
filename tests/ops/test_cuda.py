"""The Triton path on CUDA tensors: values, gradients, no host sync, CUDA graphs, torch.compile."""

from __future__ import annotations

import pytest
import torch

import fastunlearn
from fastunlearn.ops.logprob import fused_linear_logprob
from fastunlearn.ops.reference.logprob import logprob_reference
from tests.helpers.reference import (
    CASES,
    DTYPE_TOLERANCES,
    assert_close_verbose,
    check_against_reference,
    make_case,
    run_loss,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fastunlearn.has_triton(), reason="needs triton"),
]
DTYPES = list(DTYPE_TOLERANCES)


@pytest.fixture(autouse=True)
def _not_interpreting(monkeypatch):
    if fastunlearn.ops.dispatch.triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1: run the CUDA tests with TRITON_INTERPRET=0")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_float64_reference(dtype, case, reduction, force_impl):
    logits, labels = make_case(case, (4, 33), 1031, dtype, device="cuda")
    check_against_reference("triton", force_impl, logits, labels, reduction)


@pytest.mark.parametrize("n_classes", [50257, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_real_vocabularies(dtype, n_classes, force_impl):
    logits, labels = make_case("ignored", (64,), n_classes, dtype, device="cuda")
    labels[1] = logits[1].float().argmax()
    check_against_reference("triton", force_impl, logits, labels, "sum")


def test_auto_choice_is_triton_and_matches_torch_path(force_impl):
    logits, labels = make_case("ignored", (3, 40), 5003, torch.bfloat16, device="cuda")
    assert fastunlearn.select_impl(logits.device) == "triton"
    fused = run_loss(None, force_impl, logits, labels)
    torch_path = run_loss("torch", force_impl, logits, labels)
    assert_close_verbose(fused[0], torch_path[0], 1e-6, 1e-6, "loss")
    assert_close_verbose(fused[1], torch_path[1], 2**-8 * torch_path[1].abs().max().item(), 2**-7, "grad")


def test_no_host_synchronization():
    logits, labels = make_case("ignored", (8, 16), 32000, torch.bfloat16, device="cuda")
    weight = torch.randn(1000, 64, device="cuda")

    def step():
        x = logits.clone().requires_grad_(True)
        fastunlearn.ihl_loss(x, labels).backward()
        h = logits[..., :64].float().requires_grad_(True)
        fastunlearn.fused_linear_ihl(h, weight, labels.clamp(max=999)).backward()
        return x.grad, h.grad

    step()  # first call per vocabulary size autotunes the forward kernel (that synchronizes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_cuda_graph_capture_and_replay():
    logits, labels = make_case("ignored", (4, 32), 8191, torch.bfloat16, device="cuda")
    static_x = logits.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            static_x.grad = None
            fastunlearn.ihl_loss(static_x, labels).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = fastunlearn.ihl_loss(static_x, labels)
        static_loss.backward()
    fresh, _ = make_case("random", (4, 32), 8191, torch.bfloat16, device="cuda")
    with torch.no_grad():
        static_x.copy_(fresh)
    graph.replay()
    expected = fastunlearn.ihl_loss(fresh.clone().requires_grad_(True), labels)
    assert_close_verbose(static_loss, expected.detach(), 1e-6, 1e-6, "graph replay loss")


def test_torch_compile_inductor_fullgraph():
    logits, labels = make_case("ignored", (2, 64), 4099, torch.bfloat16, device="cuda")

    def step(z):
        return fastunlearn.ihl_loss(z.float() * 0.5, labels)

    compiled = torch.compile(step, fullgraph=True)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager_loss, compiled_loss = step(a), compiled(b)
    eager_loss.backward()
    compiled_loss.backward()
    assert_close_verbose(compiled_loss, eager_loss, 1e-6, 1e-6, "compiled loss")
    assert_close_verbose(b.grad, a.grad, 2**-8 * a.grad.abs().max().item(), 2**-7, "compiled grad")


def test_inplace_gradient_on_cuda(force_impl):
    logits, labels = make_case("ignored", (4, 16), 3001, torch.bfloat16, device="cuda")
    leaf = logits.clone().requires_grad_(True)
    z = leaf * 1.0
    fastunlearn.ihl_loss(z, labels, inplace_grad=True).backward()
    _, expected = run_loss("triton", force_impl, logits, labels)
    assert torch.equal(leaf.grad, expected) and torch.equal(z.detach(), expected)


def test_value_checks_opt_in_on_cuda(monkeypatch):
    logits, labels = make_case("random", (6,), 100, torch.float32, device="cuda")
    labels[2] = 100
    assert torch.isnan(fastunlearn.ihl_loss(logits, labels))  # default: no sync, NaN marks the bad row
    monkeypatch.setenv("FASTUNLEARN_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match=r"labels contains 100, outside \[0, 100\)"):
        fastunlearn.ihl_loss(logits, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_linear_on_cuda(dtype):
    h = torch.randn(300, 256, device="cuda", dtype=dtype)
    w = (torch.randn(32000, 256, device="cuda") / 16).to(dtype)
    labels = torch.randint(0, 32000, (300,), device="cuda")
    labels[::5] = -100
    grads = []
    for fn in (
        lambda h, w: fastunlearn.fused_linear_ihl(h, w, labels, chunk_rows=64),
        lambda h, w: fastunlearn.ihl_loss(h @ w.T, labels),
    ):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(hh, ww)
        loss.backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = grads
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_verbose(l1, l2, tol, tol, "loss")
    assert_close_verbose(gh1, gh2, tol * gh2.abs().max().item(), tol, "grad hidden")
    assert_close_verbose(gw1, gw2, tol * gw2.abs().max().item(), tol, "grad weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_linear_logprob_triton_matches_float64(dtype):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(257, 128, generator=gen).to(dtype).cuda()
    w = (torch.randn(50257, 128, generator=gen) / 128**0.5).to(dtype).cuda()
    b = torch.randn(50257, generator=gen).to(dtype).cuda()
    labels = torch.randint(0, 50257, (257,), generator=gen).cuda()
    labels[::7] = -100
    weights = torch.rand(257, generator=gen).cuda()
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    got = fused_linear_logprob(*leaves[:2], labels, leaves[2], chunk_rows=100, impl="triton")
    (got * weights).sum().backward()
    refs = [t.double().requires_grad_(True) for t in (h, w, b)]
    want = logprob_reference(*refs[:2], labels, refs[2])
    (want * weights.double()).sum().backward()
    assert got.dtype == torch.float32 and torch.all(got[::7] == 0)
    # bf16: the chunk logits are rounded to bf16 before the float32 reduction (the unfused path does the same)
    atol = 1e-4 if dtype == torch.float32 else 0.1
    assert_close_verbose(got, want.float(), atol, 1e-4 if dtype == torch.float32 else 2e-2, "logp")
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    for name, leaf, ref in zip(("hidden", "weight", "bias"), leaves, refs):
        assert leaf.grad.dtype == dtype
        assert_close_verbose(leaf.grad.float(), ref.grad.float(), rel * ref.grad.abs().max().item(), rel, name)


@pytest.mark.parametrize("op", ["ihl", "logprob"])
def test_fused_linear_bf16_weight_gradient_accumulates_in_float32(op):
    """grad_W = sum over chunks of dz_cᵀ h_c: accumulated in float32 (addmm), 1024 one-row chunks give the
    one-chunk result up to the final bf16 rounding; a bf16 running sum drifts by several ulps.
    h in {-1, 0, 1} and w in {-2, ..., 2} / 8 make every logit exact in bf16 whatever the GEMM's order, so
    both chunkings see the same logits and only the accumulation differs."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randint(-1, 2, (1024, 64), generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randint(-2, 3, (4096, 64), generator=gen) / 8).to(torch.bfloat16).cuda()
    labels = torch.randint(0, 4096, (1024,), generator=gen).cuda()
    fn = fastunlearn.fused_linear_ihl if op == "ihl" else fused_linear_logprob
    grads = []
    for chunk_rows in (1, 1024):
        ww = w.clone().requires_grad_(True)
        fn(h, ww, labels, chunk_rows=chunk_rows).sum().backward()
        grads.append(ww.grad.float())
    scale = grads[1].abs().max().item()
    assert scale > 0
    # within one bf16 ulp (the final rounding); a bf16 running sum fails this (checked on CPU by simulation)
    assert_close_verbose(grads[0], grads[1], 2**-12 * scale, 2**-7, "grad weight, 1-row chunks vs one chunk")
