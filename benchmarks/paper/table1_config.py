"""The settings of the paper's Table 1 experiment (``table1.py``): scales, methods, and the data it loads."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Scale:
    """Everything that sizes one benchmark: model, data, memorization and unlearning settings."""

    layers: int
    hidden: int
    heads: int
    vocab_size: int
    seq_len: int  # tokens per forget / held-out / retain sequence (the first ones of each TDEC text)
    context: int  # the model's max positions (LAMBADA passages and held-out documents use it)
    forget_files: tuple[str, ...]  # one forget set per file, its first forget_size texts
    forget_size: int
    heldout_file: str  # TDEC sequences never trained on: the stop rule's reference
    heldout_size: int
    pile_heldout_docs: int  # the last Pile documents: never trained on, the held-out perplexity
    retain_blocks: int  # WikiText blocks of seq_len tokens: the retain set
    lambada_size: int  # LAMBADA passages scored
    memorize_steps: int
    batch_general: int  # Pile / WikiText blocks per memorizer batch
    batch_forget: int  # forget sequences per memorizer batch
    lr_memorize: float
    rank: int  # LoRA / FILA rank (alpha = 2 x rank, as the official scripts)
    max_epochs: int
    lr_full: float  # the paper's is 5e-5 for full fine-tuning (small: x10, or GA barely moves the tiny model)
    lr_adapter: float  # the paper's is 2e-4 for LoRA / FILA (small: x10, the same ratio)
    lr_sweep: tuple[float, ...] = (2.0, 4.0, 8.0)  # "LoRA + IHL (tuned lr)": x lr_adapter, first that succeeds
    seed: int = 0

    def key(self, fields: tuple[str, ...] | None = None) -> str:
        """A short hash of ``fields`` (default: all): cached builds and runs are reused only for equal keys."""
        values = {k: v for k, v in asdict(self).items() if fields is None or k in fields}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


# what the tokenizer and the memorizer depend on (the unlearning settings are not among them)
BUILD_FIELDS = (
    "layers", "hidden", "heads", "vocab_size", "seq_len", "context", "forget_files", "forget_size",
    "pile_heldout_docs", "memorize_steps", "batch_general", "batch_forget", "lr_memorize", "seed",
)  # fmt: skip
TABLE_METRICS = ("el", "ma", "retain_ppl", "heldout_ppl", "lambada_acc", "lambada_ppl")  # means over forget sets

SCALES = {
    "small": Scale(
        layers=4, hidden=128, heads=4, vocab_size=4096, seq_len=64, context=128,
        forget_files=("lm_extraction_32_0.csv", "lm_extraction_32_1.csv"), forget_size=16,
        heldout_file="lm_extraction_32_2.csv", heldout_size=32, pile_heldout_docs=150, retain_blocks=64,
        lambada_size=500, memorize_steps=700, batch_general=16, batch_forget=8, lr_memorize=2e-3, rank=8,
        max_epochs=20, lr_full=5e-4, lr_adapter=2e-3,
    ),
    "full": Scale(
        layers=6, hidden=256, heads=8, vocab_size=8192, seq_len=200, context=256,
        forget_files=("lm_extraction_32_0.csv", "lm_extraction_32_1.csv", "lm_extraction_128_0.csv"), forget_size=32,
        heldout_file="lm_extraction_32_2.csv", heldout_size=32, pile_heldout_docs=150, retain_blocks=128,
        lambada_size=2000, memorize_steps=3000, batch_general=16, batch_forget=16, lr_memorize=1e-3, rank=16,
        max_epochs=20, lr_full=5e-5, lr_adapter=2e-4,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    params: str  # "full" | "lora" | "fila"
    forget_loss: str  # "ga" | "ihl"
    retain_weight: float
    row_weighting: str | None = None  # FILA's row weights: "fisher" | "uniform" | "ones"
    lr_factors: tuple[float, ...] = (1.0,)  # tried in order until one meets the criterion

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def methods(scale: Scale) -> list[Method]:
    return [
        Method("GA", "full", "ga", 0.0),
        Method("GD", "full", "ga", 1.0),
        Method("LoRA + GD", "lora", "ga", 1.0),
        Method("LoRA + IHL", "lora", "ihl", 1.0),
        Method("FILA + IHL", "fila", "ihl", 1.0, "fisher"),
        Method("SVD init, uniform rows + IHL", "fila", "ihl", 1.0, "uniform"),
        Method("SVD init, rows 1 (PiSSA-like) + IHL", "fila", "ihl", 1.0, "ones"),
        Method("LoRA + IHL (tuned lr)", "lora", "ihl", 1.0, lr_factors=scale.lr_sweep),
    ]


@dataclass
class Data:
    forget: dict[str, object]  # forget set name -> SequenceSet
    retain: object  # SequenceSet of WikiText blocks
    heldout: object  # SequenceSet of TDEC sequences never trained on
    general: object  # SequenceSet of Pile + WikiText blocks: the memorizer's LM data
    pile_heldout: list  # token ids of Pile documents never trained on
    lambada: list[tuple[list[int], list[int]]]  # (context ids, last-word ids)
    sizes: dict = field(default_factory=dict)
