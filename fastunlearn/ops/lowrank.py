"""Row-weighted low-rank approximation, batched: the SVD that FILA initializes LoRA from.

For a weight W (out, in) and nonnegative row weights w (out,) (FILA: the square root of the Fisher
information per output row), the rank-r product B A minimizing

    ‖diag(w) (W - B A)‖_F

comes from the truncated SVD of M = diag(w) W ≈ U diag(S) Vᵀ (Eckart–Young): B A = diag(1/w) U diag(S) Vᵀ,
with 1/w read as 0 where w = 0 (those rows of M, hence of U, are zero). This module returns (U, S, V) of M;
FILA splits S between the two factors.

Randomized mode (Halko, Martinsson & Tropp 2011), l = min(rank + oversample, out, in):

    Y = M Ω,  Ω ~ N(0, 1)^(in × l)
    n_iter times:  Q = qr(Y);  P = qr(Mᵀ Q);  Y = M P          (re-orthonormalized power iterations)
    Q = qr(Y);  svd(Qᵀ M) = Ũ S Vᵀ;  U = Q Ũ                  (then the top ``rank`` triplets)

costs (2 + 2 n_iter) products of M with an (in × l) or (out × l) block, against the full SVD's
O(out in min(out, in)).
``exact=True`` takes the full SVD instead. All math is float32 (bfloat16 / float16 weights are upcast).
Signs are fixed so results are reproducible: the largest-|.| entry of each column of V is positive
(lowest index on ties), with U's column flipped alongside.

One implementation, plain ATen calls (batched ``bmm``, ``linalg.qr``, ``linalg.svd``) that serve CPU and CUDA
tensors; it is the ``weighted_lowrank`` op of the registry in ``fastunlearn.ops.dispatch``. (A C++ copy of these
same calls was measured no faster and removed; see CHANGELOG.md.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastunlearn.ops import dispatch
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils import validate


class LowRank(NamedTuple):
    """Top singular triplets of M = diag(w) W: M ≈ U diag(S) Vᵀ, all float32.

    U: (..., out, r), S: (..., r) descending, V: (..., in, r); ``...`` is the batch dimension, if any.
    """

    U: Tensor
    S: Tensor
    V: Tensor


# ---------------------------------------------------------------------------------------------------------
# The implementation
# ---------------------------------------------------------------------------------------------------------
# Matrices per CPU chunk: as many as fit 2 MiB of float32 M (at least one), so each M stays in cache across its
# 2 + 2 n_iter products: measured (one thread, 2 MiB L2 per core Xeon), one 3072x768 matrix at a time is
# 1.5-1.8x faster than bmm over a stack of 6, while stacks of 256x256 or smaller gain 10-45% from batching.
# Forming M once is 10-18% faster overall than scaling the thin side of each product instead.
_CPU_CHUNK_BYTES = 2 << 20


def _orthonormal_basis(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _cpu_chunk(out: int, n_in: int) -> int:
    """CPU matrices per chunk: as many as fit 2 MiB of float32 M (at least one), so each M stays in cache
    across its products (see above). Other devices take whole batches."""
    return max(1, _CPU_CHUNK_BYTES // (out * n_in * 4))


def _lowrank_chunk(
    W: Tensor, w: Tensor, omega: Tensor, rank: int, n_iter: int, exact: bool
) -> tuple[Tensor, Tensor, Tensor]:
    M = W * w.unsqueeze(-1)  # (B, out, in) float32: type promotion upcasts bf16/fp16 W on the fly
    if exact:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (B, out, k), (B, k), (B, k, in)
        U = U.narrow(2, 0, rank)
    else:
        Y = torch.bmm(M, omega)  # (B, out, l)
        for _ in range(n_iter):
            Z = torch.bmm(M.mT, _orthonormal_basis(Y))  # (B, in, k)
            Y = torch.bmm(M, _orthonormal_basis(Z))  # (B, out, k)
        Q = _orthonormal_basis(Y)  # (B, out, k)
        Us, S, Vh = torch.linalg.svd(torch.bmm(Q.mT, M), full_matrices=False)  # (B, k, k'), (B, k'), (B, k', in)
        U = torch.bmm(Q, Us.narrow(2, 0, rank))  # (B, out, r)
    S = S.narrow(1, 0, rank)  # (B, r)
    V = Vh.narrow(1, 0, rank).mT  # (B, in, r)
    flip = V.gather(1, V.abs().argmax(1, keepdim=True)).lt(0)  # (B, 1, r)
    return torch.where(flip, -U, U).contiguous(), S.contiguous(), torch.where(flip, -V, V).contiguous()


def weighted_lowrank_torch(
    W: Tensor, w: Tensor, omega: Tensor, rank: int, n_iter: int, exact: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """W (B, out, in) float32/bf16/fp16, w (B, out) float32, omega (B, in, l) float32 -> (U, S, V) float32."""
    batch = W.shape[0]
    chunk = _cpu_chunk(*W.shape[1:]) if W.device.type == "cpu" else batch
    if chunk >= batch:
        return _lowrank_chunk(W, w, omega, rank, n_iter, exact)
    parts = []
    for b0 in range(0, batch, chunk):
        n = min(chunk, batch - b0)
        sketch = omega if exact else omega.narrow(0, b0, n)
        parts.append(_lowrank_chunk(W.narrow(0, b0, n), w.narrow(0, b0, n), sketch, rank, n_iter, exact))
    return tuple(torch.cat(ts) for ts in zip(*parts))


# ---------------------------------------------------------------------------------------------------------
# Checks. Each error names the argument and the bad value.
# ---------------------------------------------------------------------------------------------------------
def _check_config(rank: object, oversample: object, n_iter: object, exact: object) -> None:
    validate.check_int("rank", rank, 1)
    validate.check_int("oversample", oversample, 0)
    validate.check_int("n_iter", n_iter, 0)
    validate.check_bool("exact", exact)


def _check_matrices(W: object, w: object, rank: int, what: str = "") -> None:
    """W (..., out, in) float, w (..., out) float finite >= 0 on W's device, rank <= min(out, in).

    W's values are not read here (a pass over every weight): a NaN or inf in W makes the result non-finite,
    and only then does :func:`_non_finite_reason` look for it. The row-weight check synchronizes on CUDA;
    this op synchronizes anyway (LAPACK / cuSOLVER status).
    """
    wn, rn = f"W{what}", f"row_weights{what}"
    validate.check_float_tensor(wn, W, min_dim=2)
    validate.check_float_tensor(rn, w)
    if W.dim() > 3 or 0 in W.shape:
        raise ValueError(f"{wn} must be a non-empty (out, in) matrix or (B, out, in) batch, got {tuple(W.shape)}")
    if w.shape != W.shape[:-1]:
        raise ValueError(
            f"{rn} must have shape {tuple(W.shape[:-1])} (one weight per row of {wn}), got {tuple(w.shape)}"
        )
    if w.device != W.device:
        raise ValueError(f"{rn} is on {w.device} but {wn} is on {W.device}")
    if rank > min(W.shape[-2:]):
        raise ValueError(
            f"rank must be <= min(out, in) = {min(W.shape[-2:])} for {wn} of shape {tuple(W.shape)}, got {rank}"
        )
    bad = ~(torch.isfinite(w) & (w >= 0))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{rn} must be finite and >= 0, got {w[first].item()} at index {first} ({int(bad.sum())} such weights)"
        )


def _non_finite_reason(W: Tensor, w: Tensor, names: list[str], known_non_finite: bool) -> str | None:
    """Why a batch (with valid row weights) failed in LAPACK or gave non-finite factors: W has NaN or inf,
    or M's float32 products overflow (blamed whatever the magnitude when the result is ``known_non_finite``).
    None when neither explains a LAPACK failure."""
    for Wb, name in zip(W, names):
        n_bad = int((~torch.isfinite(Wb)).sum())
        if n_bad:
            return f"{name} has {n_bad} non-finite values (NaN or inf)"
    peaks = (W.double().abs().amax(dim=-1) * w.double()).amax(dim=-1)  # (B,) max |M_ij| = max_i w_i max_j |W_ij|
    b = int(peaks.argmax())
    peak = float(peaks[b])
    if known_non_finite or peak * W.shape[-1] > 1e36:  # M Ω sums `in` products, |Ω| < ~6: near float32 max
        return (
            f"the float32 products of M = diag(row_weights) {names[b]} overflow (max |M_ij| = {peak:.3g}): "
            f"rescale the weights or the row weights (U and V do not change, S scales along)"
        )
    return None


def _seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    if validate.is_int(seed):
        return [seed + b for b in range(batch)]
    if isinstance(seed, Sequence) and len(seed) == batch and all(validate.is_int(s) for s in seed):
        return list(seed)
    raise TypeError(f"seed must be an int or a sequence of {batch} ints (one per matrix), got {seed!r}")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _run(
    W: Tensor, w: Tensor, rank: int, oversample: int, n_iter: int, exact: bool, seeds: list[int], names: list[str],
    impl: str | None = None,
) -> LowRank:  # fmt: skip
    """Checked (B, out, in) batch -> LowRank; matrix b's Ω comes from a generator seeded with seeds[b], and
    it is called names[b] in errors."""
    _, out, n_in = W.shape
    if exact:
        omega = W.new_empty(0, dtype=torch.float32)
    else:
        cols = min(rank + oversample, out, n_in)
        gen = torch.Generator(W.device)
        omega = torch.stack(
            [torch.randn(n_in, cols, generator=gen.manual_seed(s), device=W.device) for s in seeds]
        )  # (B, in, l)
    factor = dispatch.implementation("weighted_lowrank", dispatch.select("weighted_lowrank", W.device, impl=impl))
    w = w.to(torch.float32)
    try:
        result = LowRank(*factor(W, w, omega, rank, n_iter, exact))
    except torch.linalg.LinAlgError as exc:  # CPU LAPACK refuses non-finite input (CUDA returns NaN)
        reason = _non_finite_reason(W, w, names, known_non_finite=False)
        if reason is None:
            raise
        raise ValueError(reason) from exc
    if not bool(torch.isfinite(result.S).all()):
        raise ValueError(_non_finite_reason(W, w, names, known_non_finite=True))
    return result


def weighted_lowrank(
    W: Tensor,
    row_weights: Tensor,
    rank: int,
    *,
    oversample: int = 8,
    n_iter: int = 2,
    exact: bool = False,
    seed: int | Sequence[int] = 0,
    impl: str | None = None,
) -> LowRank:
    """Top-``rank`` SVD of ``diag(row_weights) W`` for one (out, in) matrix or a (B, out, in) batch.

    row_weights: (out,) or (B, out), finite and >= 0. oversample: extra test-matrix columns (the range
    finder uses l = min(rank + oversample, out, in)). n_iter: power iterations. exact: full SVD instead.
    seed: matrix b's Gaussian test matrix comes from ``torch.Generator(W.device).manual_seed(seed + b)``
    (or ``seed[b]`` for a sequence), so a matrix gets the same result alone or in any batch position
    that gives it the same seed. ``impl``: the implementation (only "torch" exists; None: automatic). Returns
    :class:`LowRank` (float32; unbatched for a 2-D ``W``).
    """
    _check_config(rank, oversample, n_iter, exact)
    _check_matrices(W, row_weights, rank)
    single = W.dim() == 2
    if single:
        W, row_weights = W.unsqueeze(0), row_weights.unsqueeze(0)
    names = ["W"] if single else [f"W[{b}]" for b in range(W.shape[0])]
    result = _run(W, row_weights, rank, oversample, n_iter, exact, _seeds(seed, W.shape[0]), names, impl)
    return LowRank(*(t.squeeze(0) for t in result)) if single else result


def weighted_lowrank_grouped(
    weights: dict[str, Tensor],
    row_weights: dict[str, Tensor],
    rank: int,
    *,
    oversample: int = 8,
    n_iter: int = 2,
    exact: bool = False,
    seed: int = 0,
    max_batch_bytes: int = 2**30,
    progress: bool = True,
    distributed: bool | None = None,
    impl: str | None = None,
) -> dict[str, LowRank]:
    """:func:`weighted_lowrank` of many layers, batched by (shape, dtype, device): name -> LowRank.

    weights: name -> (out, in); row_weights: name -> (out,), the same names. A batch holds at most
    ``max_batch_bytes`` of float32 M = diag(w) W (at least one matrix; on CPU at most one cache-sized
    chunk, see ``_cpu_chunk``). The k-th layer (in ``weights`` order) is drawn with seed ``seed + k``,
    so results do not depend on how layers are batched. Shapes, dtypes and row weights of every layer are
    checked before any work starts; a non-finite weight is reported, by layer name, when its batch runs.

    Multi-process (``distributed``; None: when a ``torch.distributed`` process group is initialized): every
    rank passes the same layers; the batches are shared out by size (largest first, to the least loaded
    rank), each rank factors its own, then each batch's result is broadcast from its rank, so every rank
    returns the one-process result (the same batches, computed by the same code). An error on one rank is
    raised on all. ``impl``: as in :func:`weighted_lowrank`.
    """
    _check_config(rank, oversample, n_iter, exact)
    validate.check_int("max_batch_bytes", max_batch_bytes, 1)
    validate.check_int("seed", seed)
    if not isinstance(weights, dict) or not isinstance(row_weights, dict):
        raise TypeError(
            f"weights and row_weights must be dicts, got {type(weights).__name__}, {type(row_weights).__name__}"
        )
    if weights.keys() != row_weights.keys():
        missing, extra = sorted(weights.keys() - row_weights.keys()), sorted(row_weights.keys() - weights.keys())
        raise ValueError(f"row_weights must have the names of weights: missing {missing}, unexpected {extra}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    names = list(weights)
    for k, name in enumerate(names):
        W = weights[name]
        _check_matrices(W, row_weights[name], rank, what=f"[{name!r}]")
        if W.dim() != 2:
            raise ValueError(f"W[{name!r}] must be an (out, in) matrix, got shape {tuple(W.shape)}")
        groups[(tuple(W.shape), W.dtype, W.device)].append(k)
    batches = []
    for (shape, _, device), members in groups.items():
        per_batch = max(1, max_batch_bytes // (4 * shape[0] * shape[1]))
        if device.type == "cpu":  # the op runs CPU chunks one by one anyway: stacking more only copies
            per_batch = min(per_batch, _cpu_chunk(*shape))
        batches += [members[i : i + per_batch] for i in range(0, len(members), per_batch)]
    process = dist_utils.resolve(distributed)
    costs = [len(b) * weights[names[b[0]]].numel() for b in batches]
    owners = dist_utils.balanced_owners(costs, process.world_size)
    factored: dict[int, LowRank] = {}  # batch index -> (B, ...) result
    error = None
    try:
        mine = [i for i, owner in enumerate(owners) if owner == process.rank]
        for i in tqdm(mine, desc="weighted low-rank", unit="batch", disable=not (progress and process.is_main)):
            factored[i] = _run_batch(
                batches[i], weights, row_weights, names, (rank, oversample, n_iter, exact), seed, impl
            )
    except (ValueError, RuntimeError) as exc:
        error = exc
    if process.distributed:
        dist_utils.raise_together(error)
        for i, batch in enumerate(batches):  # the owner sends its result, the others receive it
            factored[i] = _broadcast_factors(factored.get(i), batch, weights[names[batch[0]]], rank, owners[i])
    elif error is not None:
        raise error
    results = {
        names[k]: LowRank(U[b], S[b], V[b]) for i, (U, S, V) in factored.items() for b, k in enumerate(batches[i])
    }
    return {name: results[name] for name in names}


def _run_batch(batch, weights, row_weights, names, options, seed, impl) -> LowRank:
    """One batch of same-shape layers (indices into ``names``) -> (B, ...) LowRank."""
    if len(batch) == 1:  # a view, no copy
        W, w = weights[names[batch[0]]].unsqueeze(0), row_weights[names[batch[0]]].unsqueeze(0)
    else:
        W = torch.stack([weights[names[k]] for k in batch])  # (B, out, in)
        w = torch.stack([row_weights[names[k]] for k in batch])  # (B, out)
    seeds, labels = [seed + k for k in batch], [f"W[{names[k]!r}]" for k in batch]
    return _run(W, w, *options, seeds, labels, impl)


def _broadcast_factors(own: LowRank | None, batch: list[int], W: Tensor, rank: int, owner: int) -> LowRank:
    """``own`` on rank ``owner``; elsewhere, float32 (B, out, r), (B, r), (B, in, r) received from it."""
    out, n_in = W.shape
    device = dist_utils.comm_device()
    shapes = ((len(batch), out, rank), (len(batch), rank), (len(batch), n_in, rank))
    parts = [t.to(device) for t in own] if own is not None else [torch.empty(s, device=device) for s in shapes]
    for t in parts:
        torch.distributed.broadcast(t, src=owner)
    return LowRank(*(t.to(W.device) for t in parts))


def weighted_error(W: Tensor, row_weights: Tensor, U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """‖diag(w) W - U diag(S) Vᵀ‖_F in float64, per matrix: the weighted error ‖diag(w)(W - B A)‖_F of FILA's
    factors B A = diag(1/w) U diag(S) Vᵀ (1/0 read as 0) whenever U diag(S) vanishes on the rows where w = 0,
    as it does for M's SVD (up to rounding).
    """
    M = W.double() * row_weights.double().unsqueeze(-1)  # (..., out, in)
    approx = (U.double() * S.double().unsqueeze(-2)) @ V.double().mT  # (..., out, in)
    return torch.linalg.matrix_norm(M - approx)
