"""What an audit is asked to do (:class:`AuditConfig`, validated on construction): which probes, in which formats,
with which budgets. Every default is documented in ``fastunlearn.evals.audit``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fastunlearn.ops import quant
from fastunlearn.utils.validate import check_int, check_number, is_number

PROBES = ("quantization", "relearning", "membership")
# a round trip of 135M weights: 1.3 to 2 CPU seconds for the 32-weight formats, 4 for nf4 (one core)
DEFAULT_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "nf4")
# on request: the K-quants' scale search costs 7 to 11 CPU seconds for 135M weights (benchmarks/results/audit-cost)
SLOW_FORMATS = ("q4_k", "q6_k")


@dataclass(frozen=True)
class AuditConfig:
    """The probes of :func:`fastunlearn.evals.audit.audit` and their budgets; every field is checked on
    construction (ValueError naming the field and the value)."""

    probes: tuple[str, ...] = PROBES  # which probes run, any of PROBES
    formats: tuple[str, ...] = DEFAULT_FORMATS  # quantization: formats of fastunlearn.ops.quant.FORMATS
    el_n: int = 10  # n of EL_n
    max_sequences: int | None = 128  # each set (forget, held-out, retain): a seeded sample of at most this many
    batch_size: int = 16  # sequences per forward when measuring
    relearn_steps: int = 10  # relearning: AdamW steps on relearn_rows rows (the whole batch each step)
    relearn_lr: float = 1e-4  # relearning: AdamW learning rate (betas 0.9, 0.999; no weight decay)
    relearn_rows: int = 2  # relearning: rows trained on; the other rows of the set are scored
    relearn_trials: int = 1  # relearning: seeded draws of the trained rows, averaged
    pre_ma: float | None = None  # the forget set's MA before unlearning when no reference model is given
    pre_el: float | None = None  # the forget set's EL_n before unlearning when no reference model is given
    min_k: float = 0.2  # membership: the fraction k of Min-K% and Min-K%++ (Shi et al. 2024: 20 %)
    membership_z: float = 2.5  # membership: an AUC this many null standard deviations from the target fails
    logits_mb: float = 256.0  # membership: the (B, T, V) float32 logits of one forward stay below this (1 row at least)
    seed: int = 0  # the samples, the relearning rows and the relearning steps

    def __post_init__(self) -> None:
        for name in ("probes", "formats"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"{name} must be a tuple of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        unknown = [p for p in self.probes if p not in PROBES]
        if not self.probes or unknown or len(set(self.probes)) != len(self.probes):
            raise ValueError(f"probes must be distinct names of {PROBES} (at least one), got {self.probes!r}")
        unknown = [f for f in self.formats if f not in quant.FORMATS]
        if unknown or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be distinct names of {quant.FORMATS}, got {self.formats!r}")
        check_int("el_n", self.el_n, 1)
        if self.max_sequences is not None:
            check_int("max_sequences", self.max_sequences, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("relearn_steps", self.relearn_steps, 1)
        check_number("relearn_lr", self.relearn_lr, 0, strict=True)
        check_int("relearn_rows", self.relearn_rows, 1)
        check_int("relearn_trials", self.relearn_trials, 1)
        for name in ("pre_ma", "pre_el"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1] or None, got {value!r}")
        if not (is_number(self.min_k) and 0 < self.min_k <= 1):
            raise ValueError(f"min_k must be a number in (0, 1], got {self.min_k!r}")
        check_number("membership_z", self.membership_z, 0, strict=True)
        check_number("logits_mb", self.logits_mb, 0, strict=True)
        check_int("seed", self.seed, 0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
