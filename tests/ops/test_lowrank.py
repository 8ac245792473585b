"""Row-weighted low-rank SVD (fastunlearn.ops.lowrank) against float64 SVDs: accuracy, edge cases, paths, API."""

from __future__ import annotations

import pytest
import torch

from fastunlearn.ops.lowrank import LowRank, weighted_error, weighted_lowrank, weighted_lowrank_grouped
from tests.helpers.backends import IMPL_PARAMS
from tests.helpers.reference import assert_close_verbose

LOWRANK_IMPLS = [p for p in IMPL_PARAMS if p.id == "torch"]  # the registry's weighted_lowrank op: torch only


pytestmark = pytest.mark.usefixtures("one_thread")  # LAPACK on these small matrices: fastest so


def with_spectrum(out: int, n_in: int, sigma: torch.Tensor, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, out, in) float32 U diag(sigma) Vᵀ with random orthonormal U (out, k), V (in, k)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(out, n_in)
    U = torch.linalg.qr(torch.randn(batch, out, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(batch, n_in, k, generator=gen, dtype=torch.float64)).Q
    return ((U * sigma.double()) @ V.mT).float()


def decaying(out: int, n_in: int, batch: int = 1, alpha: float = 1.0) -> torch.Tensor:
    """Distinct, polynomially decaying singular values σ_i = i^-alpha."""
    return with_spectrum(out, n_in, torch.arange(1, min(out, n_in) + 1) ** -alpha, batch)


def fisher_like(batch: int, out: int, seed: int = 1) -> torch.Tensor:
    """Heavy-tailed positive row weights (square roots of a Fisher diagonal spread over orders of magnitude)."""
    return torch.exp(torch.randn(batch, out, generator=torch.Generator().manual_seed(seed)))


def weighted64(W: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return W.double() * w.double().unsqueeze(-1)


def optimum(W: torch.Tensor, w: torch.Tensor, rank: int) -> torch.Tensor:
    """The smallest rank-r weighted error (float64 Eckart–Young): the norm of M's trailing singular values."""
    return torch.linalg.svdvals(weighted64(W, w))[..., rank:].norm(dim=-1)


def assert_near_optimal(W, w, result, rank, factor=1.01):
    """Weighted error within ``factor`` of the optimum, plus float32 SVD rounding (1e-5 ‖M‖_F, ~100 ulp)."""
    err, best = weighted_error(W, w, *result), optimum(W, w, rank)
    floor = 1e-5 * torch.linalg.matrix_norm(weighted64(W, w))
    assert bool((err <= factor * best + floor).all()), f"error {err.tolist()} vs optimum {best.tolist()}"


def assert_factors_valid(result: LowRank, rank: int):
    """Finite float32 factors, orthonormal columns, S descending >= 0, V's largest-|.| entries positive."""
    U, S, V = result
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert all(bool(torch.isfinite(t).all()) for t in result)
    eye = torch.eye(rank, dtype=torch.float64)
    assert_close_verbose(U.double().mT @ U.double(), eye.expand(*U.shape[:-2], rank, rank), 1e-5, 0, "UᵀU")
    assert_close_verbose(V.double().mT @ V.double(), eye.expand(*V.shape[:-2], rank, rank), 1e-5, 0, "VᵀV")
    assert bool((S[..., :-1] >= S[..., 1:]).all() and (S >= 0).all())
    assert bool((V.gather(-2, V.abs().argmax(-2, keepdim=True)) > 0).all())


def test_weighted_error_matches_its_definition():
    """The yardstick of every accuracy test: ‖diag(w)(W - diag(1/w) U S Vᵀ)‖_F, the optimum for M's SVD."""
    W, w = torch.randn(2, 30, 20, dtype=torch.float64), fisher_like(2, 30).double()
    U, S, Vh = torch.linalg.svd(weighted64(W, w), full_matrices=False)
    U, S, V = U[..., :5], S[..., :5], Vh[:, :5].mT
    direct = torch.linalg.matrix_norm(w[..., None] * (W - (U * S[:, None] / w[..., None]) @ V.mT))
    assert_close_verbose(weighted_error(W, w, U, S, V), direct, 1e-12, 1e-12, "weighted error")
    assert_close_verbose(weighted_error(W, w, U, S, V), optimum(W, w, 5), 1e-12, 1e-12, "optimum")
    zero = weighted_error(W, w, U, torch.zeros_like(S), V)
    assert_close_verbose(zero, torch.linalg.matrix_norm(weighted64(W, w)), 1e-12, 1e-12, "rank-0 error")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=str)
@pytest.mark.parametrize("impl", LOWRANK_IMPLS)
def test_exact_mode_equals_float64_svd(impl, shape, dtype, force_impl):
    rank = 12
    W, w = decaying(*shape, batch=3).to(dtype), fisher_like(3, shape[0])
    with force_impl(impl):
        result = weighted_lowrank(W, w, rank, exact=True)
    assert_factors_valid(result, rank)
    U64, S64, Vh64 = torch.linalg.svd(weighted64(W, w), full_matrices=False)
    scale = S64[:, :1]  # (B, 1) spectral norms
    assert_close_verbose(result.S / scale, S64[:, :rank] / scale, 2e-6, 0, "S / σ_1")
    best = (U64[..., :rank] * S64[:, None, :rank]) @ Vh64[:, :rank]  # the unique rank-r optimum (σ_r > σ_r+1)
    got = (result.U.double() * result.S.double()[:, None]) @ result.V.double().mT
    assert_close_verbose(got / scale[..., None], best / scale[..., None], 1e-5, 0, "U S Vᵀ / σ_1")


@pytest.mark.parametrize(
    "shape, spectrum",
    [((768, 768), "gaussian"), ((3072, 768), "decaying"), ((160, 384), "decaying"), ((384, 160), "slow")],
    ids=str,
)
def test_randomized_is_within_1_percent_of_the_optimum(shape, spectrum):
    rank = 16
    W = {
        "gaussian": lambda: torch.randn(1, *shape),
        "decaying": lambda: decaying(*shape, alpha=1.0),
        "slow": lambda: decaying(*shape, alpha=0.5),
    }[spectrum]()
    w = fisher_like(1, shape[0])
    result = weighted_lowrank(W, w, rank)
    assert_factors_valid(result, rank)
    assert_near_optimal(W, w, result, rank)
    # The 1% bound is tight enough to catch a broken range finder: one pass without power iterations
    # or oversampling misses it on every case here.
    crude = weighted_lowrank(W, w, rank, oversample=0, n_iter=0)
    assert not bool((weighted_error(W, w, *crude) <= 1.01 * optimum(W, w, rank)).all())


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(
    "case", ["zero", "constant", "rank_one", "ill_conditioned", "zero_rows", "zero_weights", "tiny_and_huge"]
)
def test_degenerate_inputs_give_finite_correct_factors(case, exact):
    rank, out, n_in = 8, 48, 40
    gen = torch.Generator().manual_seed(3)
    W, w = torch.randn(out, n_in, generator=gen), torch.rand(out, generator=gen) + 0.5
    if case == "zero":
        W = torch.zeros(out, n_in)
    elif case == "constant":
        W = torch.full((out, n_in), 0.25)
    elif case == "rank_one":
        W = torch.outer(torch.randn(out, generator=gen), torch.randn(n_in, generator=gen))
    elif case == "ill_conditioned":  # σ from 1 down to 1e-30
        W = with_spectrum(out, n_in, torch.logspace(0, -30, n_in))[0]
    elif case == "zero_rows":
        w[::3] = 0.0
    elif case == "zero_weights":
        w = torch.zeros(out)
    elif case == "tiny_and_huge":  # row weights 1e-15 .. 1e15: M's rows span 30 orders of magnitude
        w = torch.logspace(-15, 15, out)
        W = W * 1e-3
    result = weighted_lowrank(W, w, rank, exact=exact)
    assert_factors_valid(result, rank)
    assert_near_optimal(W, w, result, rank)
    if case in ("zero", "zero_weights"):
        assert bool((result.S == 0).all())
    if case == "zero_rows":  # M's zero rows are zero in U (FILA divides by w there)
        assert result.U[::3].abs().max() <= 1e-6


@pytest.mark.parametrize("impl", LOWRANK_IMPLS)
def test_batched_equals_per_matrix_and_unbatched_shapes(impl, force_impl):
    W, w = decaying(120, 90, batch=4, alpha=0.7), fisher_like(4, 120)
    with force_impl(impl):
        batched = weighted_lowrank(W, w, 6, seed=7)
        singles = [weighted_lowrank(W[b], w[b], 6, seed=7 + b) for b in range(4)]
        listed = weighted_lowrank(W, w, 6, seed=[7, 8, 9, 10])
    assert singles[0].U.shape == (120, 6) and singles[0].S.shape == (6,) and singles[0].V.shape == (90, 6)
    for name, x, y, z in zip(LowRank._fields, batched, zip(*singles), listed):
        assert_close_verbose(x, torch.stack(y), 1e-5, 1e-5, f"batched {name} vs per matrix")
        assert torch.equal(x, z)


def test_seed_gives_reproducible_randomness():
    W, w = torch.randn(2, 64, 50), torch.rand(2, 64)
    a, b = weighted_lowrank(W, w, 4, seed=1), weighted_lowrank(W, w, 4, seed=1)
    c = weighted_lowrank(W, w, 4, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.U, c.U)


def test_grouped_equals_ungrouped_whatever_the_batching():
    layers = {
        "h.0.q": torch.randn(64, 48), "h.0.fc": torch.randn(96, 48), "h.1.q": torch.randn(64, 48),
        "h.1.fc": torch.randn(96, 48), "h.2.q": torch.randn(64, 48), "lm.bf16": torch.randn(64, 48).bfloat16(),
    }  # fmt: skip
    rows = {name: torch.rand(W.shape[0]) for name, W in layers.items()}
    one_per_batch = weighted_lowrank_grouped(layers, rows, 5, seed=3, max_batch_bytes=1, progress=False)
    all_at_once = weighted_lowrank_grouped(layers, rows, 5, seed=3, progress=False)
    assert list(one_per_batch) == list(layers)
    for k, (name, W) in enumerate(layers.items()):
        alone = weighted_lowrank(W, rows[name], 5, seed=3 + k)
        for field, x, y, z in zip(LowRank._fields, alone, one_per_batch[name], all_at_once[name]):
            assert torch.equal(x, y), f"{name}.{field}: one layer per batch differs from the single call"
            assert_close_verbose(z, x, 1e-5, 1e-5, f"{name}.{field} batched with its group")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda W, w: weighted_lowrank(W.double(), w, 4), TypeError, "W must be float32, bfloat16 or float16"),
        (lambda W, w: weighted_lowrank(W, w.long(), 4), TypeError, "row_weights must be float32"),
        (lambda W, w: weighted_lowrank(W.numpy(), w, 4), TypeError, "W must be a torch.Tensor"),
        (lambda W, w: weighted_lowrank(W[0, 0], w, 4), ValueError, "W must have at least 2 dimension"),
        (lambda W, w: weighted_lowrank(W[None], w, 4), ValueError, r"W must be a non-empty .* got \(1, 2, 20, 12\)"),
        (lambda W, w: weighted_lowrank(W[:, :0], w[:, :0], 4), ValueError, "W must be a non-empty"),
        (lambda W, w: weighted_lowrank(W, w[:, :-1], 4), ValueError, r"row_weights must have shape \(2, 20\)"),
        (lambda W, w: weighted_lowrank(W, w, 13), ValueError, r"rank must be <= min\(out, in\) = 12 .* got 13"),
        (lambda W, w: weighted_lowrank(W, w, 0), ValueError, "rank must be an int >= 1, got 0"),
        (lambda W, w: weighted_lowrank(W, w, 4.0), TypeError, "rank must be an int >= 1, got 4.0"),
        (lambda W, w: weighted_lowrank(W, w, 4, oversample=-1), ValueError, "oversample must be an int >= 0"),
        (lambda W, w: weighted_lowrank(W, w, 4, n_iter=True), TypeError, "n_iter must be an int >= 0, got True"),
        (lambda W, w: weighted_lowrank(W, w, 4, exact=1), TypeError, "exact must be a bool"),
        (lambda W, w: weighted_lowrank(W, w, 4, seed=[1]), TypeError, "seed must be an int or a sequence of 2"),
        (lambda W, w: weighted_lowrank(W, w.index_put((torch.tensor(1), torch.tensor(3)), torch.tensor(-0.5)), 4),
         ValueError, r"row_weights must be finite and >= 0, got -0.5 at index \(1, 3\)"),
        (lambda W, w: weighted_lowrank(W, w.index_put((torch.tensor(0),), torch.tensor(float("nan"))), 4),
         ValueError, r"row_weights must be finite and >= 0, got nan at index \(0, 0\) \(20 such weights\)"),
        (lambda W, w: weighted_lowrank_grouped({"a": W[0]}, {"b": w[0]}, 4), ValueError, r"missing \['a'\]"),
        (lambda W, w: weighted_lowrank_grouped({"a": W}, {"a": w}, 4), ValueError, r"W\['a'\] must be an \(out, in\)"),
        (lambda W, w: weighted_lowrank_grouped({"a": W[0]}, {"a": -w[0]}, 4), ValueError, r"row_weights\['a'\]"),
        (lambda W, w: weighted_lowrank_grouped({"a": W[0]}, {"a": w[0]}, 4, max_batch_bytes=0), ValueError,
         "max_batch_bytes must be an int >= 1"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_errors_naming_the_argument(call, error, match):
    W, w = torch.randn(2, 20, 12), torch.rand(2, 20)
    with pytest.raises(error, match=match):
        call(W, w)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("impl", LOWRANK_IMPLS)
def test_non_finite_weights_and_overflow_are_named(impl, exact, force_impl):
    """W's values are checked only when the result is non-finite (or LAPACK refuses it): then named."""
    W, w = torch.randn(3, 20, 12), torch.rand(3, 20) + 0.5
    with force_impl(impl):
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = W.clone()
            bad[1, 4, 7], bad[1, 0, 0] = value, value
            with pytest.raises(ValueError, match=r"^W\[1\] has 2 non-finite values"):
                weighted_lowrank(bad, w, 4, exact=exact)
        with pytest.raises(ValueError, match=r"M = diag\(row_weights\) W\[2\] overflow \(max \|M_ij\| = 2e\+40\)"):
            weighted_lowrank(
                W.index_fill(0, torch.tensor(2), 1e20), w.index_fill(0, torch.tensor(2), 2e20), 4, exact=exact
            )
        big = weighted_lowrank(W * 1e20, w * 1e10, 4, exact=exact)  # large but representable: fine
        assert_close_verbose(big.S / 1e30, weighted_lowrank(W, w, 4, exact=exact).S, 0, 1e-4, "S scales along")
        layers = {"a": W[0], "b": W[1].clone(), "c": W[2]}
        layers["b"][3, 5] = float("nan")
        with pytest.raises(ValueError, match=r"W\['b'\] has 1 non-finite values"):
            weighted_lowrank_grouped(layers, dict(zip(layers, w)), 4, exact=exact, progress=False)


def test_forced_path_without_this_op_raises(force_impl):
    with force_impl("triton"), pytest.raises(RuntimeError, match="this op has no 'triton' path"):
        weighted_lowrank(torch.randn(8, 6), torch.rand(8), 2)
    with pytest.raises(RuntimeError, match="implementation 'csrc' was requested .* has no 'csrc' path"):
        weighted_lowrank(torch.randn(8, 6), torch.rand(8), 2, impl="csrc")
