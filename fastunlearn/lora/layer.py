"""LoRA adapters around existing linear layers, their initializations, and injection into a model.

``LoRALinear`` wraps an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; weight stored (in, out)) in
place, without copying its weight:

    y = W0 x + b + (alpha / r) B A dropout(x)        (rsLoRA: alpha / sqrt(r))

with A: (r, in) and B: (out, r). The base layer is kept as ``self.base`` and frozen. The adapters are
float32 parameters whatever the base dtype (stable optimizer updates next to a bf16/fp16 model); the
adapter path is computed in the input's dtype, the factors being cast on the fly.

Initializations (each leaves the layer's output unchanged up to dtype rounding):

- ``reset_lora()``: A Kaiming-uniform (a = sqrt(5), as ``nn.Linear``), B = 0; the base weight is untouched.
- ``init_from_factors(A, B)``: the adapters start at the given factors and the base weight becomes
  ``W0 - scale B A`` (computed in float32, cast back). FILA builds its factors from Fisher information
  and calls this.
- ``init_pissa()``: ``init_from_factors`` with the top-r SVD of W0: A = diag(sqrt(S')) V^T,
  B = U diag(sqrt(S')), S' = S / scale.

After a factor-based init the initial factors are kept as the buffers ``lora_a0`` / ``lora_b0`` (None
for a plain LoRA init): the original weight is ``base.weight + scale B0 A0``, which the PEFT export
and ``disabled`` need. ``disabled = True`` gives the original layer's output, ``W0 x + b``, whatever the
init (after a factor-based init that is ``base(x) + scale B0 A0 x``); the trained adapter is bypassed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunlearn.lora.targets import find_targets, is_conv1d, is_linear_like, weight_out_in
from fastunlearn.utils.validate import check_fraction, check_number, is_int

INITS = ("lora", "pissa")


def _check_hyperparameters(rank: object, alpha: object, dropout: object, n_out: int, n_in: int, name: str) -> None:
    where = f"layer {name} ({n_out} out x {n_in} in)"
    if not (is_int(rank, 1) and rank <= min(n_out, n_in)):
        raise ValueError(f"rank must be an integer in [1, min(out, in) = {min(n_out, n_in)}] for {where}, got {rank!r}")
    check_number("alpha", alpha, 0, strict=True)
    check_fraction("dropout", dropout)


class LoRALinear(nn.Module):
    """``y = W0 x + b + scale * B A dropout(x)``, scale = alpha / r (rsLoRA: alpha / sqrt(r)).

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to wrap; kept as ``self.base`` and frozen, weight not copied.
        rank: r, in [1, min(out, in)].
        alpha: the scale's numerator, > 0.
        dropout: dropout probability on the adapter's input, in [0, 1).
        use_rslora: scale = alpha / sqrt(r) instead of alpha / r.
        name: the layer's name in error messages (``inject_lora`` passes the qualified module name).

    Attributes:
        lora_a (r, in), lora_b (out, r): float32 trainable factors.
        lora_a0, lora_b0: the initial factors after ``init_from_factors``/``init_pissa``, else None.
        disabled: when True, the output is the original layer's (see the module docstring).
        merged: whether ``merge()`` folded the adapter into the base weight.
    """

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        *, name: str = "LoRALinear",
    ) -> None:  # fmt: skip
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        n_out, n_in = weight_out_in(base).shape
        _check_hyperparameters(rank, alpha, dropout, n_out, n_in, name)
        if not base.weight.dtype.is_floating_point:
            raise TypeError(f"base weight of layer {name} must be floating point, got {base.weight.dtype}")
        self.base = base.requires_grad_(False)
        self.name = name
        self.in_features, self.out_features = n_in, n_out
        self.rank, self.alpha, self.dropout_p, self.use_rslora = rank, alpha, float(dropout), use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, device=device, dtype=torch.float32))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=device, dtype=torch.float32))  # (out, r)
        self.register_buffer("lora_a0", None)
        self.register_buffer("lora_b0", None)
        self.disabled = False
        self.merged = False
        self.reset_lora()

    @property
    def is_conv1d(self) -> bool:
        return is_conv1d(self.base)

    def _adapter(self, x: Tensor, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        """out + scale * (x A^T) B^T in x's dtype; the add is fused into the second GEMM."""
        h = F.linear(x, a.to(x.dtype)).reshape(-1, self.rank)  # (N, r)
        flat = torch.addmm(out.reshape(-1, self.out_features), h, b.to(x.dtype).t(), alpha=self.scale)  # (N, out)
        return flat.view(out.shape)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            if self.disabled:
                raise RuntimeError(f"LoRA layer {self.name} is merged: unmerge() it before setting disabled")
            return out
        if self.disabled:
            return out if self.lora_a0 is None else self._adapter(x, self.lora_a0, self.lora_b0, out)
        return self._adapter(self.dropout(x), self.lora_a, self.lora_b, out)

    # -----------------------------------------------------------------------------------------------------
    # Weight arithmetic: W (out, in) + sum of sign * scale * B A in float32, checked before anything changes
    # -----------------------------------------------------------------------------------------------------
    def _shifted_weight(self, terms: Sequence[tuple[float, Tensor, Tensor]], action: str) -> Tensor:
        """float32 (out, in); raises (naming the layer) if any entry is NaN or inf."""
        new = weight_out_in(self.base).detach().float()
        for sign, a, b in terms:
            new = torch.addmm(new, b.detach().float(), a.detach().float(), alpha=sign * self.scale)  # (out, in)
        if not torch.isfinite(new).all():
            raise ValueError(f"{action} of LoRA layer {self.name} gives NaN or inf weights: the adapter is broken")
        return new

    def _store(self, w_out_in: Tensor) -> None:
        """Write a float32 (out, in) weight into the base weight, rounding to its dtype."""
        weight_out_in(self.base).detach().copy_(w_out_in)

    def _restore_terms(self) -> list[tuple[float, Tensor, Tensor]]:
        """The term that turns the base weight back into the original one (none after a plain LoRA init)."""
        return [] if self.lora_a0 is None else [(1.0, self.lora_a0, self.lora_b0)]

    def _check_unmerged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"LoRA layer {self.name} is merged: unmerge() it before {action}")

    def merged_weight(self) -> Tensor:
        """The base weight with the trained adapter folded in, in the base layout ((in, out) for Conv1D).

        A new tensor (the live weight is not modified) unless the layer is merged."""
        if self.merged:
            return self.base.weight.detach()
        w = self._shifted_weight([(1.0, self.lora_a, self.lora_b)], "merge").to(self.base.weight.dtype)
        return w.t().contiguous() if self.is_conv1d else w

    # -----------------------------------------------------------------------------------------------------
    # Initializations
    # -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora(self) -> None:
        """A Kaiming-uniform (a = sqrt(5)), B = 0; restores the original base weight if an init changed it."""
        self._check_unmerged("reset_lora()")
        if self.lora_a0 is not None:
            self._store(self._shifted_weight(self._restore_terms(), "reset_lora"))
            self.lora_a0 = self.lora_b0 = None
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @torch.no_grad()
    def init_from_factors(self, a: Tensor, b: Tensor) -> None:
        """Adapters := (A (r, in), B (out, r)); base weight := original W0 - scale B A; keeps A0, B0 = A, B."""
        self._check_unmerged("init_from_factors()")
        for arg, t, shape in (("a", a, (self.rank, self.in_features)), ("b", b, (self.out_features, self.rank))):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != shape:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{arg} must be a float tensor of shape {shape} for layer {self.name}, got {got}")
        a0 = a.detach().to(self.lora_a.device, torch.float32).clone()
        b0 = b.detach().to(self.lora_a.device, torch.float32).clone()
        self._store(self._shifted_weight([*self._restore_terms(), (-1.0, a0, b0)], "init_from_factors"))
        self.lora_a.copy_(a0)
        self.lora_b.copy_(b0)
        self.lora_a0, self.lora_b0 = a0, b0

    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA: the adapters take the top-r singular triplets of the original weight (unweighted SVD)."""
        self._check_unmerged("init_pissa()")
        w = self._shifted_weight(self._restore_terms(), "init_pissa")  # original W0 (out, in), float32
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[: self.rank] / self.scale).sqrt()  # sqrt(S'), S' = S / scale
        self.init_from_factors(root[:, None] * vh[: self.rank], u[:, : self.rank] * root)

    # -----------------------------------------------------------------------------------------------------
    # Merge
    # -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the base weight (float32 arithmetic); raises if the result is not finite."""
        if self.merged:
            raise RuntimeError(f"LoRA layer {self.name} is already merged")
        self._store(self._shifted_weight([(1.0, self.lora_a, self.lora_b)], "merge"))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scale * B A from the base weight again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError(f"LoRA layer {self.name} is not merged")
        self._store(self._shifted_weight([(-1.0, self.lora_a, self.lora_b)], "unmerge"))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        return (
            f"{kind} in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
            f"scale={self.scale:.4g}, dropout={self.dropout_p}, from_factors={self.lora_a0 is not None}, "
            f"merged={self.merged}, disabled={self.disabled}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear for every adapter layer in ``model`` (in model order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRA layer of ``model`` computes the original layer's output (``disabled = True``,
    see the module docstring: after a factor-based init, ``base(x) + scale B0 A0 x``, the weight before the
    init up to rounding); each layer's previous setting is restored after. A model without adapters is unchanged."""
    layers = list(lora_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int,
    alpha: float,
    *,
    init: str = "lora",
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> dict[str, LoRALinear]:
    """Replace the layers ``targets`` matches (see ``fastunlearn.lora.targets``) by ``LoRALinear`` in place.

    Every other parameter of ``model`` is frozen; only the adapters are trainable. ``init`` is "lora" or
    "pissa" (FILA calls ``init_from_factors`` on the returned layers). Returns name -> new layer.
    All layers are validated before the model is changed.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (FILA initializes through init_from_factors), got {init!r}")
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"model already has LoRA layers ({', '.join(list(existing)[:3])}, ...): inject once")
    found = find_targets(model, targets)
    layers = {
        name: LoRALinear(module, rank, alpha, dropout, use_rslora, name=name) for name, module in found.items()
    }  # fmt: skip
    model.requires_grad_(False)  # before attaching: the new adapters stay trainable
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        if init == "pissa":
            layer.init_pissa()
    return layers


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, percent): the paper's "Params %" (shared parameters counted once)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, 100.0 * trainable / max(total, 1)
