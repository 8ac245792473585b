"""The per-token log-probability op: fused_linear_logprob (chunked, never the (N, V) logits) and token_logprob
against float64 references, in value and in every gradient; dtypes, odd shapes, a vocabulary over 65536,
ignored labels, extreme logits and bad input."""

from __future__ import annotations

import pytest
import torch

from fastunlearn.ops import dispatch
from fastunlearn.ops.logprob import fused_linear_logprob, token_logprob
from fastunlearn.ops.reference.logprob import logprob_reference
from tests.helpers.backends import IMPL_PARAMS
from tests.helpers.reference import assert_close_verbose

LOGPROB_IMPLS = [p for p in IMPL_PARAMS if p.values[0] in dispatch.OPS["logprob"].backends]


def make_inputs(n_rows=11, hidden=16, n_classes=37, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, hidden, generator=gen).to(dtype)
    w = (torch.randn(n_classes, hidden, generator=gen) / hidden**0.5).to(dtype)
    b = torch.randn(n_classes, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, n_classes, (n_rows,), generator=gen)
    labels[::4] = -100
    return h, w, b, labels


def value_and_grads(fn, tensors, weights):
    """fn(*leaves) and the gradients of sum(fn * weights) with respect to every non-None tensor."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def rows_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float64 straight from the logits (0 at -100)."""
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    return torch.where(valid, logp.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0], 0.0)


def check_against_float64(h, w, b, labels, impl=None, chunk_rows=4, value_atol=1e-5, grad_rel=1e-6):
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    got, grads = value_and_grads(
        lambda h, w, b: fused_linear_logprob(h, w, labels, b, chunk_rows=chunk_rows, impl=impl), (h, w, b), weights
    )
    want, ref_grads = value_and_grads(
        lambda h, w, b: logprob_reference(h, w, labels, b), [None if t is None else t.double() for t in (h, w, b)],
        weights.double(),
    )  # fmt: skip
    assert got.dtype == torch.float32 and got.shape == labels.shape
    assert_close_verbose(got, want, value_atol, 1e-5, "logp")
    for name, g, ref, t in zip(("hidden", "weight", "bias"), grads, ref_grads, (h, w, b)):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close_verbose(g, ref, grad_rel * ref.abs().max().item() + 1e-7, 1e-4, f"grad {name}")


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_float64_reference_in_value_and_gradients(impl, bias):
    check_against_float64(*make_inputs(bias=bias), impl=impl)


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize(("shape", "chunk_rows"), [((1,), 1), ((2, 3), 1), ((5,), 100), ((2, 7), 3), ((3, 1, 4), None)])
def test_odd_shapes_and_chunkings(impl, shape, chunk_rows):
    n = int(torch.tensor(shape).prod())
    h, w, b, labels = make_inputs(n_rows=n, hidden=5, n_classes=13, seed=n)
    check_against_float64(h.view(*shape, 5), w, b, labels.view(shape), impl=impl, chunk_rows=chunk_rows)


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_vocabulary_over_65536(impl):
    h, w, b, labels = make_inputs(n_rows=3, hidden=8, n_classes=70_001, seed=3)
    labels[:] = torch.tensor([70_000, 65_536, -100])
    check_against_float64(h, w, b, labels, impl=impl, chunk_rows=2, value_atol=2e-5, grad_rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_matches_the_unfused_path(dtype):
    h, w, _, labels = make_inputs(n_rows=9, hidden=32, n_classes=70, dtype=dtype, bias=False)
    weights = torch.rand(9)
    got, grads = value_and_grads(lambda h, w: fused_linear_logprob(h, w, labels, chunk_rows=2), (h, w), weights)
    want, ref_grads = value_and_grads(lambda h, w: token_logprob(h @ w.T, labels), (h, w), weights)
    assert got.dtype == torch.float32
    assert_close_verbose(got, want, 1e-5, 1e-5, "logp")  # the same rounded logits, both reduced in float32
    for g, ref, t in zip(grads, ref_grads, (h, w)):
        assert g.dtype == dtype and g.shape == t.shape
        assert_close_verbose(g, ref, 2e-2 * ref.abs().max().item(), 2e-2, "grad")


def test_float32_against_float64_at_a_realistic_scale():
    h, w, b, labels = make_inputs(n_rows=64, hidden=64, n_classes=1000, seed=5)
    check_against_float64(h * 3, w, b, labels, chunk_rows=17, value_atol=1e-4, grad_rel=1e-5)


def test_ignored_labels_give_zero_and_no_gradient():
    h, w, b, labels = make_inputs()
    h.requires_grad_(True)
    out = fused_linear_logprob(h, w, labels, b)
    assert (out[labels == -100] == 0).all() and (out[labels != -100] < 0).all()
    out.sum().backward()
    assert (h.grad[labels == -100] == 0).all()
    every = torch.full_like(labels, 7)  # all ignored, with another ignore_index
    leaves = [t.clone().requires_grad_(True) for t in (h.detach(), w, b)]
    out = fused_linear_logprob(*leaves[:2], every, leaves[2], ignore_index=7)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(11)) and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)
    assert torch.equal(token_logprob(h.detach() @ w.T, every, ignore_index=7), torch.zeros(11))


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_backend_rows_on_extreme_logits_match_float64(impl):
    """Huge, tiny and -inf logits (not at the label): finite log-probabilities and the exact gradient rows."""
    backend = dispatch.implementation("logprob", impl)
    z = torch.randn(6, 9) * 3
    z[0] = 1e4
    z[0, 2] = -1e4  # label 2 far below the rest: logp ~ -2e4
    z[1, 5] = 1e4  # label 5 dominates: logp ~ 0
    z[2, 3:] = float("-inf")
    z[3] = float("nan")  # an ignored row with NaN logits contributes nothing
    labels = torch.tensor([2, 5, 1, -100, 0, 8])
    logp, stats = backend.logprob_forward(z.clone(), labels, -100)  # may overwrite its logits
    zz = z.double().requires_grad_(True)
    ref = rows_reference(zz[[0, 1, 2, 4, 5]], labels[[0, 1, 2, 4, 5]])
    assert_close_verbose(logp[[0, 1, 2, 4, 5]], ref.detach(), 1e-6, 1e-6, "logp")
    assert logp[3] == 0 and torch.isfinite(logp).all()
    g = torch.rand(6)
    dz = backend.logprob_backward(g, z.clone(), labels, stats, -100)
    (ref * g[[0, 1, 2, 4, 5]].double()).sum().backward()
    assert_close_verbose(dz[[0, 1, 2, 4, 5]], zz.grad[[0, 1, 2, 4, 5]], 1e-6, 1e-6, "dz")
    assert torch.equal(dz[3], torch.zeros(9)) and dz.dtype == torch.float32


def test_never_more_than_chunk_rows_of_logits(monkeypatch):
    """Each chunk's logits are (<= chunk_rows, V): the (N, V) logits never exist (forward and backward)."""
    import fastunlearn.ops.reference.logprob as backend

    seen = []

    def spy(name: str, logits_arg: int):
        original = getattr(backend, name)

        def call(*args):
            seen.append((name, args[logits_arg].shape))
            return original(*args)

        return call

    for name, logits_arg in (("logprob_forward", 0), ("logprob_backward", 1)):
        monkeypatch.setattr(backend, name, spy(name, logits_arg))
    h, w, b, labels = make_inputs(n_rows=10)
    fused_linear_logprob(h.requires_grad_(True), w, labels, b, chunk_rows=3).sum().backward()
    assert [shape for _, shape in seen] == [(3, 37), (3, 37), (3, 37), (1, 37)] * 2
    assert [name for name, _ in seen] == ["logprob_forward"] * 4 + ["logprob_backward"] * 4


def test_token_logprob_matches_float64_reference():
    logits = torch.randn(2, 5, 11) * 4
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 2:] = -100
    leaf = logits.clone().requires_grad_(True)
    got = token_logprob(leaf, labels)
    ref = rows_reference(logits.double(), labels)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    assert_close_verbose(got.detach(), ref.detach(), 1e-6, 1e-6, "logp")
    assert torch.equal(got[1, 2:].detach(), torch.zeros(3))


def test_dispatch_serves_cpu_with_the_torch_backend():
    assert dispatch.select("logprob", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="has no 'csrc' path"):
        fused_linear_logprob(*make_inputs()[:2], make_inputs()[3], impl="csrc")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda h, w, b, y: (h, w[:, :3], b, y), ValueError, r"weight must have shape \(V, H\)"),
        (lambda h, w, b, y: (h, w[:1], b[:1], y), ValueError, "weight must have at least 2 rows"),
        (lambda h, w, b, y: (h, w, b[:5], y), ValueError, r"bias must have shape \(37,\)"),
        (lambda h, w, b, y: (h, w.double(), b, y), TypeError, "weight must be float32, bfloat16 or float16"),
        (lambda h, w, b, y: (h, w.half(), b, y), TypeError, "weight has dtype torch.float16 but hidden has"),
        (lambda h, w, b, y: (h, w, b, y[:4]), ValueError, r"labels has shape \(4,\) but hidden"),
        (lambda h, w, b, y: (h, w, b, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda h, w, b, y: (h, w, b, y.masked_fill(y == 3, 37)), ValueError, r"labels contains 37, outside \[0, 37\)"),
        (lambda h, w, b, y: ("h", w, b, y), TypeError, "hidden must be a torch.Tensor"),
        (lambda h, w, b, y: (h.masked_fill(y[:, None] >= 0, float("nan")), w, b, y), ValueError,
         "hidden/weight .their logits. has non-finite values"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(change, error, match):
    h, w, b, labels = make_inputs()
    labels[1] = 3
    h, w, b, labels = change(h, w, b, labels)
    with pytest.raises(error, match=match):
        fused_linear_logprob(h, w, labels, b, chunk_rows=4)


def test_bad_chunk_rows_and_token_logprob_input():
    h, w, b, labels = make_inputs()
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        fused_linear_logprob(h, w, labels, b, chunk_rows=0)
    with pytest.raises(ValueError, match=r"labels has shape \(11,\) but logits"):
        token_logprob(torch.randn(3, 5), labels)
    with pytest.raises(ValueError, match=r"labels contains 9, outside \[0, 5\)"):
        token_logprob(torch.randn(2, 5), torch.tensor([1, 9]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_triton_matches_the_torch_path_at_a_real_vocabulary(dtype):
    h, w, b, labels = make_inputs(n_rows=300, hidden=64, n_classes=128_256, dtype=dtype, seed=6)
    h, w, b, labels = (t.cuda() for t in (h, w, b, labels))
    weights = torch.rand(300, device="cuda")
    results = {}
    for impl in ("triton", "torch"):
        results[impl] = value_and_grads(
            lambda h, w, b, impl=impl: fused_linear_logprob(h, w, labels, b, chunk_rows=128, impl=impl), (h, w, b),
            weights,
        )  # fmt: skip
    (got, grads), (want, ref_grads) = results["triton"], results["torch"]
    assert_close_verbose(got, want, 1e-4, 1e-5, "logp")
    for g, ref in zip(grads, ref_grads):
        assert_close_verbose(g, ref, 2e-2 * ref.abs().max().item(), 2e-2, "grad")
