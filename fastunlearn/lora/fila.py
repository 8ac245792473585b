"""FILA: LoRA adapters initialized from Fisher information (Cha et al., arXiv 2408.06621, Sec. 4).

For each target weight W (out, in):

1. Empirical Fisher on the forget set F_f and on the retain set F_r (``fastunlearn.lora.fisher``).
2. Relative importance F_rel = F_f / (eps + F_r) (token-normalized for the per-batch estimator).
3. Row weights w_i = sqrt(sum_j F_rel[i, j]): how much output row i matters to the forget set
   relative to the retain set.
4. Weighted rank-r approximation: min ‖diag(w)(W - W_r)‖_F, from the SVD diag(w) W ≈ U S Vᵀ
   (``fastunlearn.ops.lowrank``, same-shape layers batched).
5. LoRA factors with S' = S / scale: A = (V √S')ᵀ (r, in), B = diag(1/w) U √S' (out, r), so that
   scale·B·A = diag(1/w) U S Vᵀ = W_r; the base weight becomes W - scale·B·A (in float32, then cast).
   The model is unchanged at init; training moves the adapters, which start on the parameters that
   matter most to the forget set. Rows with w_i = 0 have U_i = 0 and get B_i = 0 (the official code
   divides by w + 1e-5 instead; both give 0 there).

``row_weighting`` selects the controls of the paper's ablation: ``"fisher"`` (FILA), ``"uniform"`` (every
row weighted by FILA's mean weight: the same SVD initialization without the Fisher's direction) and
``"ones"`` (PiSSA-like, the plain SVD of W).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastunlearn.lora.fisher import FisherResult, empirical_fisher, relative_fisher
from fastunlearn.lora.layer import LoRALinear, inject_lora
from fastunlearn.lora.targets import find_targets, is_conv1d, weight_out_in
from fastunlearn.ops.lowrank import LowRank, weighted_lowrank_grouped
from fastunlearn.utils import validate

FISHER_MODES = ("per_example", "per_batch")
ROW_WEIGHTINGS = ("fisher", "uniform", "ones")


@dataclass
class FilaConfig:
    rank: int = 16  # LoRA rank r (the paper's default)
    alpha: float = 32.0  # LoRA alpha; scale = alpha / r (the official scripts use alpha = 2r)
    fisher_mode: str = "per_example"  # "per_example" (paper Eq. 2) or "per_batch" (official code)
    eps: float = 1e-5  # in F_f / (eps + F_r)
    row_weighting: str = "fisher"  # "fisher" (FILA), "uniform" or "ones" (ablation controls)
    use_rslora: bool = False  # scale = alpha / sqrt(r)
    dropout: float = 0.0  # LoRA dropout (the official code uses 0)
    oversample: int = 8  # randomized SVD: extra test columns
    n_iter: int = 2  # randomized SVD: power iterations
    exact: bool = False  # full SVD instead of the randomized one
    seed: int = 0  # randomized SVD test matrices
    batch_size: int = 8  # sequences per Fisher batch

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size"):
            validate.check_int(name, getattr(self, name), 1)
        for name in ("oversample", "n_iter", "seed"):
            validate.check_int(name, getattr(self, name), 0)
        for name in ("alpha", "eps"):
            validate.check_number(name, getattr(self, name), 0, strict=True)
        validate.check_fraction("dropout", self.dropout)
        for name in ("use_rslora", "exact"):
            validate.check_bool(name, getattr(self, name))
        validate.check_choice("fisher_mode", self.fisher_mode, FISHER_MODES)
        validate.check_choice("row_weighting", self.row_weighting, ROW_WEIGHTINGS)


@dataclass
class FilaResult:
    layers: dict[str, LoRALinear]  # the injected adapters, initialized
    row_weights: dict[str, Tensor]  # w (out,) per layer, float32
    forget_fisher: FisherResult
    retain_fisher: FisherResult
    config: FilaConfig = field(repr=False, default_factory=FilaConfig)


def row_weights_from_fisher(relative: dict[str, Tensor], modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """w_i = sqrt(sum_j F_rel[i, j]) over each layer's output rows (Conv1D Fisher is stored (in, out))."""
    weights = {}
    for name, module in modules.items():
        rel = relative[name].t() if is_conv1d(module) else relative[name]  # (out, in)
        weights[name] = rel.to(torch.float32).sum(dim=1).sqrt()
    return weights


def _apply_weighting(fisher_weights: dict[str, Tensor], row_weighting: str) -> dict[str, Tensor]:
    if row_weighting == "fisher":
        return fisher_weights
    if row_weighting == "ones":
        return {name: torch.ones_like(w) for name, w in fisher_weights.items()}
    return {name: torch.full_like(w, w.mean().item()) for name, w in fisher_weights.items()}


def lora_factors(low_rank: LowRank, row_weights: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """A = (V √S')ᵀ (r, in) and B = diag(1/w) U √S' (out, r), S' = S / scale; 1/w read as 0 where w = 0."""
    root = (low_rank.S / scale).sqrt()  # (r,)
    inv_w = torch.where(row_weights > 0, 1.0 / row_weights, torch.zeros_like(row_weights))  # (out,)
    a = (low_rank.V * root).t()  # (r, in)
    b = inv_w[:, None] * low_rank.U * root  # (out, r)
    return a, b


def _lowrank_input(W: Tensor) -> Tensor:
    """The low-rank step's math is float32: a float64 weight is rounded to it (lower precisions are upcast there)."""
    return W.detach().float() if W.dtype == torch.float64 else W.detach()


def _check_data_ids(name: str, data: object, model: nn.Module) -> None:
    """:func:`fastunlearn.utils.validate.check_token_ids` on the input_ids ``data`` holds (input_ids (N, T), a dict
    with "input_ids", or a list / tuple of these; empty or float ones are left to the Fisher). Other iterables are
    read once by their consumer, so they are not inspected here."""
    for batch in data if isinstance(data, (list, tuple)) else [data]:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        if isinstance(ids, Tensor) and ids.numel() and not ids.is_floating_point():
            validate.check_token_ids(name, ids, model)


def fila_init(
    model: nn.Module,
    forget_data: object,
    retain_data: object,
    targets: str | list[str] = "preset",
    config: FilaConfig | None = None,
    **overrides: object,
) -> FilaResult:
    """Inject LoRA adapters into ``model``'s ``targets`` and initialize them with FILA.

    forget_data / retain_data: anything :func:`fastunlearn.lora.fisher.empirical_fisher` takes (input_ids
    (N, T), a batch dict, or an iterable of batch dicts). ``config`` fields can be overridden by keyword
    (``fila_init(model, f, r, rank=8)``). Returns the layers, row weights and both Fisher results; only
    the adapters are left trainable.
    """
    cfg = FilaConfig(**{**(config.__dict__ if config else {}), **overrides})
    _check_data_ids("forget_data", forget_data, model)
    _check_data_ids("retain_data", retain_data, model)
    modules = find_targets(model, targets)
    names = list(modules)
    fisher_kw = {"mode": cfg.fisher_mode, "batch_size": cfg.batch_size}
    forget = empirical_fisher(model, forget_data, names, **fisher_kw)
    retain = empirical_fisher(model, retain_data, names, **fisher_kw)
    fisher_w = row_weights_from_fisher(relative_fisher(forget, retain, cfg.eps), modules)
    row_weights = _apply_weighting(fisher_w, cfg.row_weighting)
    with torch.no_grad():
        low_rank = weighted_lowrank_grouped(
            {name: _lowrank_input(weight_out_in(m)) for name, m in modules.items()}, row_weights, cfg.rank,
            oversample=cfg.oversample, n_iter=cfg.n_iter, exact=cfg.exact, seed=cfg.seed,
        )  # fmt: skip
    layers = inject_lora(model, names, cfg.rank, cfg.alpha, init="lora", dropout=cfg.dropout, use_rslora=cfg.use_rslora)
    for name, layer in layers.items():
        a, b = lora_factors(low_rank[name], row_weights[name].to(low_rank[name].U.device), layer.scale)
        layer.init_from_factors(a, b)
    return FilaResult(layers, row_weights, forget, retain, cfg)
