"""What an unlearning run is asked to do (:class:`UnlearnConfig`, validated on construction) and what it returns."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastunlearn.engine import parallel
from fastunlearn.lora.fila import FilaConfig
from fastunlearn.losses import NPO_BETA, SIMNPO_BETA, SIMNPO_GAMMA, check_forget_loss, check_fused
from fastunlearn.ops.quant import FORMATS as QUANT_FORMATS
from fastunlearn.utils.validate import check_bool, check_choice, check_int, check_number, is_int, is_number

PARAMS = ("full", "lora", "fila")
STOPS = ("heldout", "threshold", "epochs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4, "fila": 2e-4}  # the paper's learning rates
DEPLOY_QUANTS = ("none", *QUANT_FORMATS, "gguf")  # deploy_quant / quant_aware; "gguf": gguf_template's types
FILA_OPTIONS = tuple(f.name for f in dataclasses.fields(FilaConfig) if f.name not in ("rank", "alpha"))


@dataclass
class UnlearnConfig:
    """How :func:`unlearn` trains and when it stops; every field is checked (ValueError naming it)."""

    forget_loss: str = "ihl"  # "ihl" (inverted hinge loss, the paper), "ga" (gradient ascent), "npo", "simnpo"
    npo_beta: float = NPO_BETA  # forget_loss="npo": beta of NPO (Zhang et al. 2024: 0.1)
    simnpo_beta: float = SIMNPO_BETA  # forget_loss="simnpo": beta of SimNPO (open-unlearning: 4.5)
    simnpo_gamma: float = SIMNPO_GAMMA  # forget_loss="simnpo": margin gamma of SimNPO (open-unlearning: 0)
    retain_weight: float = 1.0  # x retain LM loss; 0 = the forget term alone ("ga" + 0: GA; "ga" + 1: GD)
    params: str = "fila"  # trained: "full" (all weights), "lora" (adapters), "fila" (Fisher-initialized adapters)
    rank: int = 16  # LoRA rank (lora / fila)
    alpha: float = 32.0  # LoRA alpha: scale = alpha / rank
    targets: str | tuple[str, ...] = "preset"  # adapted layers: "preset" (by model type), a preset name, patterns
    lr: float | None = None  # None: the paper's 5e-5 for "full", 2e-4 for "lora" / "fila"
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (Jang et al.)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_epochs: int = 20  # an epoch is one pass over the forget set (batch_size); failure after this many
    min_epochs: int = 1  # never stop before this many epochs (stop="epochs": leave at 1)
    batch_size: int | None = None  # forget sequences per optimizer update (an epoch: ceil(N / batch_size) updates,
    # e.g. TOFU's 32); None: the whole forget set, ONE update per epoch (the paper's TDEC protocol)
    micro_batch_size: int = 8  # sequences per forward/backward; accumulation makes the update independent of it
    stop: str = "heldout"  # "heldout": forget MA, EL <= held-out set's before unlearning; "threshold": fixed ones;
    # "epochs": no criterion, exactly max_epochs epochs (TOFU's protocol; no held-out set needed)
    ma_threshold: float | None = None  # stop="threshold": forget MA limit (Jang et al.: 0.2994 for GPT-Neo 125M)
    el_threshold: float | None = None  # stop="threshold": forget EL_n limit (Jang et al.: 0.0499)
    el_n: int = 10  # n of the extraction likelihood EL_n
    dtype: str = "float32"  # model and training dtype, "float32" or "bfloat16" (LoRA adapters stay float32)
    seed: int = 0  # adapter initialization, data order, dropout
    gradient_checkpointing: bool = False  # recompute activations during backward (transformers models)
    fila: dict = field(default_factory=dict)  # params="fila": FilaConfig options (fisher_mode, eps, ...) but rank/alpha
    eval_retain_ppl: bool = False  # measure the retain set's perplexity (before, after each task, every eval_every)
    eval_every: int = 0  # retain / utility perplexities also after every eval_every-th epoch (0: only before and
    # after each task; 1: after every epoch, as before 0.x). The forget MA (EL once MA is met) is measured every epoch
    eval_retain_max: int | None = 128  # retain and utility PPL: a seeded sample of this many sequences (None: all)
    fisher_max_examples: int | None = 32  # FILA's retain Fisher on a seeded sample of this many (None: all); 32: its
    # row weights rank-correlate 0.97 with 128 blocks' on SmolLM2-135M (benchmarks/results/job-real-model)
    cache_heldout_baseline: bool = True  # reuse the held-out set's MA / EL before unlearning across runs
    eval_heldout_el_after: bool = False  # after each task, the held-out set's EL too (MA always; EL costs most)
    eval_batch_size: int = 32  # sequences per forward when measuring MA, EL and perplexity
    parallel: str = "ddp"  # with several processes: "ddp" (a model copy per rank) or "fsdp" (FSDP2 shards)
    fused_ihl: bool = False  # forget and retain terms from the last hidden states: no (B, T, V) logits (HF LMs)
    allow_heldout_overlap: bool = False  # accept held-out rows that repeat forget rows (inputs.check_heldout_overlap)
    deploy_quant: str = "none"  # also meet the criterion on the model deployed in this format (engine.deploy)
    quant_aware: str = "none"  # train at the weights deployed in this format (straight-through; engine.deploy)
    gguf_template: str | None = None  # the GGUF file the model was loaded from: the types of "gguf" formats, and
    # the file OUT/merged.gguf is written like (write_gguf)
    write_gguf: bool = True  # with gguf_template: also write OUT/merged.gguf (gguf_io.write_gguf_like)

    def __post_init__(self) -> None:
        self.targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        patterns = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not patterns or not all(isinstance(t, str) and t for t in patterns):
            raise ValueError(
                f"targets must be a preset name or a non-empty list of layer name patterns, got {self.targets!r}"
            )
        self.betas = tuple(self.betas)
        check_forget_loss(self.forget_loss)
        for name, choices in (("params", PARAMS), ("stop", STOPS), ("dtype", tuple(DTYPES)),
                              ("parallel", tuple(parallel.PARALLEL))):  # fmt: skip
            check_choice(name, getattr(self, name), choices)
        for name in ("rank", "max_epochs", "min_epochs", "micro_batch_size", "el_n", "eval_batch_size"):
            check_int(name, getattr(self, name), 1)
        if self.batch_size is not None and not is_int(self.batch_size, 1):
            raise ValueError(f"batch_size must be an int >= 1 or None (the whole forget set), got {self.batch_size!r}")
        for name in ("eval_retain_max", "fisher_max_examples"):
            if getattr(self, name) is not None and not is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an int >= 1 or None (every sequence), got {getattr(self, name)!r}")
        check_int("eval_every", self.eval_every, 0)
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs must be <= max_epochs ({self.max_epochs}), got {self.min_epochs}")
        check_int("seed", self.seed)
        if self.lr is not None and not (is_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 or None, got {self.lr!r}")
        for name in ("alpha", "npo_beta", "simnpo_beta"):
            check_number(name, getattr(self, name), 0, strict=True)
        for name in ("retain_weight", "weight_decay", "simnpo_gamma"):
            check_number(name, getattr(self, name), 0)
        if len(self.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("ma_threshold", "el_threshold"):
            value = getattr(self, name)
            if self.stop == "threshold" and not (is_number(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1] with stop='threshold', got {value!r}")
            if self.stop != "threshold" and value is not None:
                why = "stop='heldout' sets it" if self.stop == "heldout" else "stop='epochs' has no criterion"
                raise ValueError(f"{name} is only used with stop='threshold' ({why}), got {value!r}")
        if self.stop == "epochs" and self.min_epochs != 1:
            raise ValueError(f"min_epochs is not used with stop='epochs' (it runs exactly max_epochs={self.max_epochs} "
                             f"epochs): leave it at 1, got {self.min_epochs}")  # fmt: skip
        for name in ("gradient_checkpointing", "eval_retain_ppl", "fused_ihl", "cache_heldout_baseline",
                     "eval_heldout_el_after", "allow_heldout_overlap"):  # fmt: skip
            check_bool(name, getattr(self, name))
        check_fused(self.forget_loss, self.fused_ihl)
        self._check_deploy()
        if not isinstance(self.fila, dict) or (self.fila and self.params != "fila"):
            raise ValueError(f"fila must be a dict of FILA options, given only with params='fila', got {self.fila!r}")
        unknown = sorted(set(self.fila) - set(FILA_OPTIONS))
        if unknown:
            raise ValueError(f"fila has unknown options {unknown}; known: {', '.join(FILA_OPTIONS)}")
        self.fila_config()  # validates the FILA options

    def _check_deploy(self) -> None:
        for name in ("deploy_quant", "quant_aware"):
            check_choice(name, getattr(self, name), DEPLOY_QUANTS)
        check_bool("write_gguf", self.write_gguf)
        if isinstance(self.gguf_template, os.PathLike):
            self.gguf_template = os.fspath(self.gguf_template)
        if self.gguf_template is not None and not (isinstance(self.gguf_template, str) and self.gguf_template):
            raise ValueError(f"gguf_template must be a GGUF file's path or None, got {self.gguf_template!r}")
        for name in ("deploy_quant", "quant_aware"):
            if getattr(self, name) == "gguf" and self.gguf_template is None:
                raise ValueError(f"{name}='gguf' takes the tensor types of the GGUF file the model came from: "
                                 "set gguf_template to it")  # fmt: skip
            if getattr(self, name) != "none" and self.parallel == "fsdp":
                raise ValueError(f"{name}={getattr(self, name)!r} quantizes whole weights in place, which sharded "
                                 "(parallel='fsdp') weights are not: use parallel='ddp'")  # fmt: skip

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.params] if self.lr is None else self.lr

    def objective_options(self) -> dict:
        """``beta`` / ``gamma`` of :func:`fastunlearn.losses.forget_term` for this run's forget loss."""
        if self.forget_loss == "npo":
            return {"beta": self.npo_beta}
        if self.forget_loss == "simnpo":
            return {"beta": self.simnpo_beta, "gamma": self.simnpo_gamma}
        return {}

    def fila_config(self) -> FilaConfig:
        """The FilaConfig of this run (its dropout and rsLoRA settings also shape plain LoRA adapters)."""
        return FilaConfig(rank=self.rank, alpha=self.alpha, **self.fila)

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists); ``UnlearnConfig(**config.to_dict())`` gives an equal config."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class UnlearnResult:
    model: nn.Module  # the unlearned model, trained in place (adapters not merged)
    success: bool  # every forget set met the criterion when its training stopped, and still does at the end
    log: dict  # what log.json holds (engine.runlog.RunLog.to_dict()): config, baseline, epochs, stop reasons, timings
    out_dir: Path
