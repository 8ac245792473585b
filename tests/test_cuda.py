"""The Triton path on CUDA tensors: values, gradients, no host sync, CUDA graphs, torch.compile."""

from __future__ import annotations

import pytest
import torch
from reference import CASES, DTYPE_TOLERANCES, assert_close_verbose, check_against_reference, make_case, run_loss

import fastunlearn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fastunlearn.has_triton(), reason="needs triton"),
]
DTYPES = list(DTYPE_TOLERANCES)


@pytest.fixture(autouse=True)
def _not_interpreting(monkeypatch):
    if fastunlearn._dispatch.triton_interpreting():
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
