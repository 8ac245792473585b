"""The unlearning run: set up the trained parameters, then one optimizer update per epoch until the forget
set looks like data the model never saw (Cha et al., arXiv 2408.06621; protocol of Jang et al. 2023).

- **Parameters**: ``"full"`` (every weight), ``"lora"`` (LoRA adapters, A Kaiming / B zero) or ``"fila"``
  (adapters initialized from the forget set's Fisher information relative to the retain set's).
- **Epoch** = ONE AdamW update from the gradient of the whole forget set, accumulated over micro-batches. Each
  forget micro-batch is paired with a retain micro-batch (the retain set reshuffled every epoch and cycled)
  when ``retain_weight > 0``. Every term is a sum over next-token targets divided by the epoch's total target
  count, so the accumulated gradient is that of mean forget term + retain_weight x mean retain loss over the
  epoch's tokens, whatever the micro-batch size.
- **Stop**: after each epoch the forget set's MA is measured; its EL_n only once MA meets its limit (EL is
  expensive; ``None`` otherwise). ``stop="heldout"`` (the paper): MA and EL_n at or below the held-out set's
  values measured before unlearning; ``stop="threshold"``: at or below ``ma_threshold`` and ``el_threshold``.
  The run stops at the first epoch >= ``min_epochs`` that meets it; reaching ``max_epochs`` without it, or a
  non-finite loss or gradient (then no update is made), is a failure, and is recorded as one.
- **Continual**: forget sets unlearned one after another on the same model (adapters continue; a new optimizer
  per task; FILA is initialized once, from the first task). After each task every forget set so far, the
  held-out set and (if asked) the retain perplexity are measured again. The run succeeds when every task met
  the criterion and every forget set still meets it after the last task.

Outputs in ``out_dir``, each written atomically (a reader never sees a partial file): ``log.json`` after
every epoch, then ``report.md``, ``metrics.png``, ``adapter/`` (PEFT, for lora/fila) and ``merged/`` (a
transformers model; with the tokenizer if given). ``checkpoint/`` is rewritten after the setup and after
every epoch: trainable tensors, AdamW state and RNG states in safetensors, the log (epoch, metrics) in JSON;
no pickle. Called again with the same arguments on an unmodified copy of the model, an interrupted run
continues from its last finished epoch and ends as an uninterrupted one would (bit-equal on CPU; on CUDA up
to nondeterministic kernels). The checkpoint is removed when the run finishes.

**Multi-process** (a ``torch.distributed`` process group is initialized, e.g. under ``torchrun``; every rank
calls ``unlearn`` with the same arguments and its own copy of the model on its own device): FILA's Fisher
and low-rank steps are shared out and reduced (``fastunlearn.distributed``); ``parallel="ddp"`` wraps the
model in ``DistributedDataParallel``, ``"fsdp"`` shards it with FSDP2 ``fully_shard`` (per transformer
block), after the setup (adapters, FILA) and before the first evaluation; a model given on the CPU is moved
to the rank's GPU block by block as it is sharded. Each epoch's micro-batch pairs (the same list in every
rank, as one process draws it) go round robin to the ranks, so an update is the one a single process would
make (up to float rounding). Forget, held-out and retain metrics are sharded by sequence and gathered
(under FSDP, whose forwards need every rank, in lockstep: ``_parallel.lockstep``). Rank 0 alone writes
files, with the full (gathered) state; a checkpoint resumes under any world size that leaves each rank a
micro-batch. Resume restores rank 0's random state on every rank: bit-equal resumption holds for one
process, or without dropout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import _parallel
from . import distributed as dist_utils
from ._validate import is_int, is_number
from .data import SequenceSet, UnlearningData, iterate_batches
from .export import atomic_directory, save_merged_model, save_peft_adapter
from .fila import FilaConfig, fila_init
from .ihl import ihl_loss
from .integrations.patch import patch_fused_ihl, unpatch_fused_ihl
from .lora import inject_lora, lora_layers, trainable_parameters
from .metrics import extraction_likelihood, memorization_accuracy, sequence_nll
from .objectives import FORGET_LOSSES, ga_loss, retain_loss, shift_causal
from .report import check_plotting, outcome, remove_stale_temporaries, write_json, write_plot, write_report

logger = logging.getLogger(__name__)

PARAMS = ("full", "lora", "fila")
STOPS = ("heldout", "threshold")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4, "fila": 2e-4}  # the paper's learning rates
FILA_OPTIONS = tuple(f.name for f in dataclasses.fields(FilaConfig) if f.name not in ("rank", "alpha"))


@dataclass
class UnlearnConfig:
    """How :func:`unlearn` trains and when it stops; every field is checked (ValueError naming it)."""

    forget_loss: str = "ihl"  # "ihl" (inverted hinge loss, the paper) or "ga" (gradient ascent)
    retain_weight: float = 1.0  # x retain LM loss; 0 = the forget term alone ("ga" + 0: GA; "ga" + 1: GD)
    params: str = "fila"  # trained: "full" (all weights), "lora" (adapters), "fila" (Fisher-initialized adapters)
    rank: int = 16  # LoRA rank (lora / fila)
    alpha: float = 32.0  # LoRA alpha: scale = alpha / rank
    targets: str | tuple[str, ...] = "preset"  # adapted layers: "preset" (by model type), a preset name, patterns
    lr: float | None = None  # None: the paper's 5e-5 for "full", 2e-4 for "lora" / "fila"
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (Jang et al.)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_epochs: int = 20  # an epoch is one optimizer update from the whole forget set; failure after this many
    min_epochs: int = 1  # never stop before this many epochs
    micro_batch_size: int = 8  # sequences per forward/backward; accumulation makes the update independent of it
    stop: str = "heldout"  # "heldout": forget MA, EL <= held-out set's before unlearning; "threshold": fixed ones
    ma_threshold: float | None = None  # stop="threshold": forget MA limit (Jang et al.: 0.2994 for GPT-Neo 125M)
    el_threshold: float | None = None  # stop="threshold": forget EL_n limit (Jang et al.: 0.0499)
    el_n: int = 10  # n of the extraction likelihood EL_n
    dtype: str = "float32"  # model and training dtype, "float32" or "bfloat16" (LoRA adapters stay float32)
    seed: int = 0  # adapter initialization, data order, dropout
    gradient_checkpointing: bool = False  # recompute activations during backward (transformers models)
    fila: dict = field(default_factory=dict)  # params="fila": FilaConfig options (fisher_mode, eps, ...) but rank/alpha
    eval_retain_ppl: bool = False  # measure the retain set's perplexity before, after every epoch and task
    eval_batch_size: int = 32  # sequences per forward when measuring MA, EL and perplexity
    parallel: str = "ddp"  # with several processes: "ddp" (a model copy per rank) or "fsdp" (FSDP2 shards)
    fused_ihl: bool = False  # forget IHL from the last hidden states: no (B, T, V) logits (transformers LMs)

    def __post_init__(self) -> None:
        self.targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        patterns = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not patterns or not all(isinstance(t, str) and t for t in patterns):
            raise ValueError(
                f"targets must be a preset name or a non-empty list of layer name patterns, got {self.targets!r}"
            )
        self.betas = tuple(self.betas)
        for name, choices in (("forget_loss", FORGET_LOSSES), ("params", PARAMS), ("stop", STOPS), ("dtype", DTYPES),
                              ("parallel", _parallel.PARALLEL)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")
        if not (is_number(self.retain_weight) and self.retain_weight >= 0):
            raise ValueError(f"retain_weight must be a finite number >= 0, got {self.retain_weight!r}")
        for name in ("rank", "max_epochs", "min_epochs", "micro_batch_size", "el_n", "eval_batch_size"):
            if not is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs must be <= max_epochs ({self.max_epochs}), got {self.min_epochs}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (value is None and name == "lr") and not (is_number(value) and value > 0):
                raise ValueError(
                    f"{name} must be a finite number > 0{' or None' if name == 'lr' else ''}, got {value!r}"
                )
        if len(self.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("ma_threshold", "el_threshold"):
            value = getattr(self, name)
            if self.stop == "threshold" and not (is_number(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1] with stop='threshold', got {value!r}")
            if self.stop == "heldout" and value is not None:
                raise ValueError(f"{name} is only used with stop='threshold' (stop='heldout' sets it), got {value!r}")
        for name in ("gradient_checkpointing", "eval_retain_ppl", "fused_ihl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.fused_ihl and self.forget_loss != "ihl":
            raise ValueError(
                f"fused_ihl=True computes the IHL term; forget_loss={self.forget_loss!r} has no fused path"
            )
        if not isinstance(self.fila, dict) or (self.fila and self.params != "fila"):
            raise ValueError(f"fila must be a dict of FILA options, given only with params='fila', got {self.fila!r}")
        unknown = sorted(set(self.fila) - set(FILA_OPTIONS))
        if unknown:
            raise ValueError(f"fila has unknown options {unknown}; known: {', '.join(FILA_OPTIONS)}")
        self.fila_config()  # validates the FILA options

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.params] if self.lr is None else self.lr

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
    log: dict  # what log.json holds: config, baseline, every epoch's metrics, stop reasons, timings
    out_dir: Path


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def _set_name(task: int, n_tasks: int) -> str:
    return "forget set" if n_tasks == 1 else f"forget set {task + 1} of {n_tasks}"


def _n_targets(mask: torch.Tensor) -> int:
    """Next-token targets of a right-padded batch (``shift_causal`` ignores those whose token is padding)."""
    return int(mask[:, 1:].sum())


def _check_data(data, cfg: UnlearnConfig) -> tuple[list[SequenceSet], SequenceSet | None, SequenceSet | None]:
    """(forget sets, retain set, held-out set); ValueError / TypeError naming the set and what it lacks."""
    if isinstance(data, UnlearningData):
        forget, retain, heldout = data.forget, data.retain, data.heldout
        tasks = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    elif isinstance(data, (list, tuple)):
        tasks, retain, heldout = list(data), None, None
    else:
        raise TypeError(f"data must be an UnlearningData or a list of forget SequenceSets, got {type(data).__name__}")
    if not tasks:
        raise ValueError("data has no forget set: nothing to unlearn")
    sets = [(_set_name(i, len(tasks)), seqs, True) for i, seqs in enumerate(tasks)]
    sets += [("retain set", retain, False), ("held-out set", heldout, True)]
    for name, seqs, scored in sets:  # scored: MA and EL are measured on it
        if seqs is None:
            continue
        if not isinstance(seqs, SequenceSet):
            raise TypeError(f"{name} must be a SequenceSet, got {type(seqs).__name__}")
        if len(seqs) == 0 or _n_targets(seqs.attention_mask) == 0:
            raise ValueError(f"{name} is empty: it has {len(seqs)} sequences and no next-token target")
        if scored:
            seqs.check_el_length(name, cfg.el_n)
    if retain is None:
        for needs, why in (
            (cfg.retain_weight > 0, f"retain_weight={cfg.retain_weight} (set retain_weight=0 for no retain loss)"),
            (cfg.params == "fila", "params='fila' (FILA weighs forget against retain Fisher information)"),
            (cfg.eval_retain_ppl, "eval_retain_ppl=True"),
        ):
            if needs:
                raise ValueError(f"{why} needs a retain set, and data has none")
    if cfg.stop == "heldout" and heldout is None:
        raise ValueError("stop='heldout' needs a held-out set, and data has none (or use stop='threshold')")
    return tasks, retain, heldout


def _fingerprint(sets: Sequence[SequenceSet | None]) -> str:
    digest = hashlib.sha256()
    for seqs in sets:
        for t in (None,) if seqs is None else (seqs.input_ids, seqs.attention_mask):
            digest.update(b"none" if t is None else repr(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Parameters, checkpoint
# ---------------------------------------------------------------------------------------------------------
def _batch(seqs: SequenceSet) -> dict[str, torch.Tensor]:
    return {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask}


def _setup_params(model: nn.Module, cfg: UnlearnConfig, forget: SequenceSet, retain, saved: dict | None) -> None:
    """Make the trained parameters trainable (and only those). On resume (``saved``), FILA adapters are
    rebuilt from their saved initial factors instead of recomputing the Fisher information."""
    if cfg.params == "full":
        model.requires_grad_(True)
        return
    fila = cfg.fila_config()
    if cfg.params == "fila" and saved is None:
        fila_init(model, _batch(forget), _batch(retain), cfg.targets, fila)
        return
    layers = inject_lora(model, cfg.targets, cfg.rank, cfg.alpha, dropout=fila.dropout, use_rslora=fila.use_rslora)
    if cfg.params == "fila":
        for name, layer in layers.items():  # base weight := W0 - scale B0 A0, exactly as fila_init left it
            layer.init_from_factors(saved[f"buffer.{name}.lora_a0"], saved[f"buffer.{name}.lora_b0"])


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of a transformers model (non-reentrant: frozen inputs are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing needs a transformers model, got {type(model).__name__}")


def _save_checkpoint(path: Path, model: nn.Module, optimizer, generator: torch.Generator, log: dict) -> None:
    """Rank 0 writes the full state (every rank must call: under FSDP the state is gathered)."""
    tensors = {f"param.{n}": t.contiguous() for n, t in _parallel.trainable_state(model).items()}
    for name, layer in lora_layers(model).items():
        if layer.lora_a0 is not None:
            tensors[f"buffer.{name}.lora_a0"] = layer.lora_a0.contiguous()
            tensors[f"buffer.{name}.lora_b0"] = layer.lora_b0.contiguous()
    if optimizer is not None:
        for index, state in _parallel.optimizer_state(model, optimizer).items():
            tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
    if not dist_utils.current().is_main:
        return
    tensors["rng.torch"], tensors["rng.data"] = torch.get_rng_state(), generator.get_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # this process's GPU only: touching the others would start a context on each
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"format": 1, "log": log}, indent=1))


def _load_params_and_rng(model: nn.Module, saved: dict, generator: torch.Generator) -> None:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {k.removeprefix("param.") for k in saved if k.startswith("param.")}
    if names != set(trainable):
        raise ValueError(
            f"the checkpoint's trainable parameters differ from this model's: only in the checkpoint "
            f"{sorted(names - set(trainable))[:3]}, only in the model {sorted(set(trainable) - names)[:3]}"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[f"param.{name}"])
    torch.set_rng_state(saved["rng.torch"])
    generator.set_state(saved["rng.data"])
    device = next(model.parameters()).device
    if "rng.cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng.cuda"], device)


def _load_optimizer(model: nn.Module, optimizer, saved: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in saved.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    _parallel.load_optimizer_state(model, optimizer, state)


def _prepare_out_dir_on_all_ranks(out: Path, resume: bool, process) -> tuple[dict | None, dict | None]:
    """Rank 0 first (it removes stale temporaries), then the others read the same checkpoint; an error on
    rank 0 is raised on every rank. Resuming on several processes needs out_dir on a shared file system."""
    first: tuple | None = None
    error = None
    if process.is_main:
        try:
            first = _prepare_out_dir(out, resume)
        except (FileExistsError, OSError, ValueError) as exc:
            error = exc
    dist_utils.raise_together(error)
    return first if process.is_main else _prepare_out_dir(out, resume)


def _prepare_out_dir(out: Path, resume: bool) -> tuple[dict | None, dict | None]:
    """(saved tensors, saved log) of a checkpoint to resume, or (None, None) for a fresh run in an empty out_dir."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a directory")
    remove_stale_temporaries(out)  # left by a run killed while writing
    state = out / "checkpoint" / "state.json"
    if resume and state.is_file():
        return load_file(str(state.with_suffix(".safetensors"))), json.loads(state.read_text())["log"]
    if out.exists() and any(out.iterdir()):
        what = "a checkpoint (pass resume=True to continue it)" if state.is_file() else "no checkpoint to resume"
        raise FileExistsError(f"out_dir {str(out)!r} is not empty and holds {what}; remove it or choose another")
    return None, None


# ---------------------------------------------------------------------------------------------------------
# Metrics and the epoch
# ---------------------------------------------------------------------------------------------------------
def _per_sequence(fn: Callable[[SequenceSet], torch.Tensor], seqs: SequenceSet, model: nn.Module) -> torch.Tensor:
    """``fn(seqs)`` (N, ...) float64 per sequence. Multi-process: each rank computes its share of the sequences
    (under FSDP in lockstep, see ``_parallel.lockstep``) and every rank gets all rows."""
    process = dist_utils.current()
    if not process.distributed:
        return fn(seqs)
    index = torch.tensor(dist_utils.owned(len(seqs), process), dtype=torch.int64)
    with _parallel.lockstep(model):
        local = fn(seqs[index]) if len(index) else torch.zeros(0, dtype=torch.float64)
    return dist_utils.gather_rows(local, index, len(seqs))


def _measure(model: nn.Module, seqs: SequenceSet, cfg: UnlearnConfig, limit: float | None = None) -> dict:
    """{"ma", "el"}: mean MA, and mean EL_n unless ``limit`` is given and MA is above it (then None)."""
    batch = cfg.eval_batch_size
    ma = _per_sequence(
        lambda s: memorization_accuracy(model, s.input_ids, s.attention_mask, batch_size=batch), seqs, model
    )
    ma = ma.mean().item()
    if limit is not None and ma > limit:
        return {"ma": ma, "el": None}
    el = _per_sequence(
        lambda s: extraction_likelihood(
            model, s.input_ids, cfg.el_n, attention_mask=s.attention_mask, batch_size=batch
        ),
        seqs,
        model,
    )
    return {"ma": ma, "el": el.mean().item()}


def _retain_ppl(model: nn.Module, retain: SequenceSet | None, cfg: UnlearnConfig) -> float | None:
    """Token-weighted perplexity of the retain set (padding removed)."""
    if not cfg.eval_retain_ppl:
        return None

    def nll_and_count(seqs: SequenceSet) -> torch.Tensor:  # (n, 2) float64
        rows = [ids[: int(mask.sum())] for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]
        nll, count = sequence_nll(model, rows, batch_size=cfg.eval_batch_size)
        return torch.stack([nll, count.double()], dim=1)

    nll, count = _per_sequence(nll_and_count, retain, model).sum(0).tolist()
    return math.exp(nll / count)


def _met(metrics: dict, criterion: dict) -> bool:
    return metrics["el"] is not None and metrics["ma"] <= criterion["ma"] and metrics["el"] <= criterion["el"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _epoch_pairs(forget, retain, cfg: UnlearnConfig, generator) -> list[tuple[dict, dict | None]]:
    """(forget micro-batch, retain micro-batch or None) pairs of one epoch: the same list on every rank."""
    f_batches = list(iterate_batches(forget, cfg.micro_batch_size, shuffle=True, generator=generator))
    r_batches = []
    if retain is not None and cfg.retain_weight > 0:
        r_batches = list(iterate_batches(retain, cfg.micro_batch_size, shuffle=True, generator=generator))
    pairs = [(f, r_batches[i % len(r_batches)] if r_batches else None) for i, f in enumerate(f_batches)]
    process = dist_utils.current()
    if len(pairs) < process.world_size:
        raise ValueError(
            f"the forget set gives {len(pairs)} micro-batches of micro_batch_size={cfg.micro_batch_size}, fewer "
            f"than the {process.world_size} processes: lower micro_batch_size so that every rank gets one"
        )
    return pairs


def _reduce_summary(sums: torch.Tensor, extremes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums added over the ranks, and the max of ``extremes`` (negate to get a min)."""
    if dist_utils.current().distributed:
        sums, extremes = sums.to(dist_utils.comm_device()), extremes.to(dist_utils.comm_device())
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    return sums, extremes


def _train_epoch(train_model, optimizer, params, forget, retain, cfg: UnlearnConfig, generator, device) -> dict:
    """Accumulate the whole forget set's gradient over micro-batches, then make ONE update (unless not finite).
    Multi-process: rank r runs pairs r, r + world_size, ...; its last backward reduces the gradients."""
    pairs = _epoch_pairs(forget, retain, cfg, generator)
    n_forget = sum(_n_targets(f["attention_mask"]) for f, _ in pairs)
    n_retain = sum(_n_targets(r["attention_mask"]) for _, r in pairs if r is not None)
    process = dist_utils.current()
    mine = pairs[process.rank :: process.world_size]
    scale = process.world_size  # DDP / FSDP average the ranks' gradients; the update needs their sum
    forget_fn = ihl_loss if cfg.forget_loss == "ihl" else ga_loss
    optimizer.zero_grad(set_to_none=True)
    train_model.train()
    f_sums, r_sums, f_means = [], [], []  # stay on the device: no host sync inside the loop
    progress = tqdm(mine, desc="micro-batches", leave=False, disable=None if process.is_main else True)
    for i, (f, r) in enumerate(progress):
        n = _n_targets(f["attention_mask"])  # counted on the CPU copy: no sync
        with _parallel.gradient_sync(train_model, enabled=i == len(mine) - 1):
            f = {k: v.to(device) for k, v in f.items()}
            if cfg.fused_ihl:  # patched forward (fastunlearn.integrations.patch): IHL without the logits
                f_sum = train_model(**f, ihl=True, reduction="sum").loss
            else:
                f_sum = forget_fn(*shift_causal(train_model(**f, use_cache=False).logits, **f), reduction="sum")
            loss = f_sum / n_forget  # this micro-batch's share of the mean over the epoch's forget targets
            if r is not None:
                r = {k: v.to(device) for k, v in r.items()}
                r_sum = retain_loss(*shift_causal(train_model(**r, use_cache=False).logits, **r), reduction="sum")
                loss = loss + cfg.retain_weight * r_sum / n_retain
                r_sums.append(r_sum.detach())
            (loss * scale).backward()
        f_sums.append(f_sum.detach())
        if n:
            f_means.append(f_sum.detach() / n)
    grad_norm = _parallel.total_norm([p.grad for p in params if p.grad is not None])
    means = torch.stack(f_means)
    retain_sum = torch.stack(r_sums).sum() if r_sums else torch.zeros((), device=device)
    sums, extremes = _reduce_summary(
        torch.stack([torch.stack(f_sums).sum(), retain_sum]), torch.stack([-means.min(), means.max()])
    )
    summary = torch.stack(
        [sums[0] / n_forget, -extremes[0], extremes[1], sums[1] / max(n_retain, 1), grad_norm.to(sums.device)]
    )
    forget_loss, low, high, retain_value, norm = summary.tolist()  # host sync: once per epoch
    finite = all(math.isfinite(v) for v in (forget_loss, retain_value, norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients while evaluating
    return {
        "forget_loss": _finite(forget_loss),  # mean forget term over the epoch's forget targets, before the update
        "retain_loss": _finite(retain_value) if n_retain else None,
        "forget_loss_range": [_finite(low), _finite(high)],  # min, max of the micro-batches' mean forget term
        "grad_norm": _finite(norm),
        "updated": finite,
    }


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _new_log(model: nn.Module, cfg: UnlearnConfig, tasks, retain, heldout, device) -> dict:
    trainable, total, percent = trainable_parameters(model)
    return {
        "status": "running",
        "config": cfg.to_dict(),
        "learning_rate": cfg.learning_rate,
        "data": {
            "forget": [len(t) for t in tasks],
            "retain": None if retain is None else len(retain),
            "heldout": None if heldout is None else len(heldout),
            "seq_len": tasks[0].seq_len,
            "fingerprint": _fingerprint([*tasks, retain, heldout]),
        },
        "model": {
            "class": type(model).__name__,
            "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
            "device": str(device),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": percent,
        },
        "criterion": None,
        "baseline": None,
        "tasks": [],
        "success": None,
        "outputs": None,
        "resumes": 0,
        "timings": {"setup_s": 0.0, "baseline_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "export_s": 0.0, "total_s": 0.0},
    }


def _check_resume(log: dict, cfg: UnlearnConfig, tasks, retain, heldout) -> None:
    if log["config"] != cfg.to_dict():
        diff = sorted(k for k in log["config"] if log["config"][k] != cfg.to_dict().get(k))
        raise ValueError(f"the checkpoint in out_dir was made with a different config (fields {diff}): cannot resume")
    if log["data"]["fingerprint"] != _fingerprint([*tasks, retain, heldout]):
        raise ValueError("the checkpoint in out_dir was made with different data: cannot resume")


def _baseline(model: nn.Module, cfg: UnlearnConfig, tasks, retain, heldout) -> tuple[dict, dict]:
    """(metrics before unlearning, the criterion's limits)."""
    before = {
        "forget": [_measure(model, t, cfg) for t in tasks],
        "heldout": None if heldout is None else _measure(model, heldout, cfg),
        "retain_ppl": _retain_ppl(model, retain, cfg),
    }
    limits = before["heldout"] if cfg.stop == "heldout" else {"ma": cfg.ma_threshold, "el": cfg.el_threshold}
    return before, {"stop": cfg.stop, "ma": limits["ma"], "el": limits["el"]}


def _stop_reason(record: dict, cfg: UnlearnConfig) -> str | None:
    epoch = record["epoch"]
    if not record["updated"]:
        return f"non-finite loss or gradient at epoch {epoch}: stopped without that update"
    if record["criterion_met"] and epoch >= cfg.min_epochs:
        return f"criterion met at epoch {epoch}"
    if epoch == cfg.max_epochs:
        return f"max_epochs ({cfg.max_epochs}) reached without meeting the criterion"
    return None


def _export(model: nn.Module, cfg: UnlearnConfig, out: Path, tokenizer) -> dict[str, str]:
    """adapter/ (PEFT, for the unmodified base model) and merged/ (a plain transformers model + tokenizer),
    written by rank 0 (from a CPU copy of the full weights under FSDP; every rank must call)."""
    if _parallel.is_sharded(model):
        model = _parallel.cpu_replica(model)
    outputs = {"merged": "merged", "report": "report.md", "plot": "metrics.png"}
    if not dist_utils.current().is_main:
        return outputs
    outputs = {}
    if cfg.params != "full":
        save_peft_adapter(model, out / "adapter", overwrite=True)
        outputs["adapter"] = "adapter"
    with atomic_directory(out / "merged", overwrite=True) as tmp:
        if cfg.params == "full":
            model.save_pretrained(tmp)
        else:
            save_merged_model(model, tmp, overwrite=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {**outputs, "merged": "merged", "report": "report.md", "plot": "metrics.png"}


def unlearn(
    model: nn.Module,
    data: UnlearningData | Sequence[SequenceSet],
    config: UnlearnConfig,
    out_dir: str | Path,
    *,
    tokenizer=None,
    resume: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> UnlearnResult:
    """Unlearn ``data``'s forget set(s) from ``model`` (trained in place) and write the run to ``out_dir``.

    ``data``: an :class:`UnlearningData`; its ``forget`` may be a list of SequenceSets (continual unlearning,
    e.g. from ``split_tasks``), sharing its retain and held-out sets; or a plain list of forget SequenceSets
    (no retain or held-out set: needs ``retain_weight=0``, ``params`` other than "fila", ``stop="threshold"``).
    ``out_dir`` must be empty or missing, unless it holds the checkpoint of an interrupted run and ``resume``
    (then pass the same, unmodified model, data and config). ``tokenizer`` is saved with the merged model.
    ``on_epoch_end(task_index, epoch_record)`` runs after each epoch's checkpoint is written.
    """
    if not isinstance(config, UnlearnConfig):
        raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    cfg, out, process = config, Path(out_dir), dist_utils.current()
    tasks, retain, heldout = _check_data(data, cfg)
    check_plotting()
    saved, log = _prepare_out_dir_on_all_ranks(out, resume, process)
    if log is not None:
        _check_resume(log, cfg, tasks, retain, heldout)
    info = logger.info if process.is_main else lambda *args: None
    write = write_json if process.is_main else lambda *args: None
    session_start = clock = time.perf_counter()
    done_before = 0.0 if log is None else log["timings"]["total_s"]

    def lap(key: str) -> float:  # seconds since the previous lap, added to log["timings"][key]
        nonlocal clock
        seconds, clock = time.perf_counter() - clock, time.perf_counter()
        log["timings"][key] += seconds
        log["timings"]["total_s"] = done_before + clock - session_start
        return seconds

    # ---- setup: dtype, trained parameters, seeds; then the baseline (fresh run) or the checkpoint (resume)
    was_training = model.training
    model.to(DTYPES[cfg.dtype])
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    _setup_params(model, cfg, tasks[0], retain, saved)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if saved is not None:
        _load_params_and_rng(model, saved, generator)  # full tensors: before FSDP shards the parameters
    if cfg.fused_ihl:
        patch_fused_ihl(model)  # before wrapping: DDP / FSDP call the patched forward
    train_model = _parallel.wrap(model, cfg.parallel, next(model.parameters()).device)  # the model in one process
    device = next(model.parameters()).device  # FSDP moves a model on the CPU to this rank's GPU as it shards
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in its shards
    ckpt = out / "checkpoint"
    if saved is None:
        log = _new_log(model, cfg, tasks, retain, heldout, device)
        lap("setup_s")
        log["baseline"], log["criterion"] = _baseline(model, cfg, tasks, retain, heldout)
        lap("baseline_s")
        _save_checkpoint(ckpt, model, None, generator, log)  # a resume skips the setup (FILA's Fisher) and baseline
    else:
        log["resumes"] += 1
        lap("setup_s")
    write(out / "log.json", log)
    crit, counts = log["criterion"], log["model"]
    info(
        "params=%s: %d of %d parameters trainable (%.3f%%), lr %g | criterion (%s): forget MA <= %s, EL_%d <= %s%s",
        cfg.params, counts["trainable_params"], counts["total_params"], counts["trainable_percent"], cfg.learning_rate,
        cfg.stop, _fmt(crit["ma"]), cfg.el_n, _fmt(crit["el"]), " | resumed from the checkpoint" if saved else "",
    )  # fmt: skip

    # ---- the tasks (one unless continual), each epoch one update, until the stop rule
    running = len(log["tasks"]) - 1  # the task whose optimizer state the checkpoint holds (-1: none)
    for k, forget in enumerate(tasks):
        if k < len(log["tasks"]) and log["tasks"][k]["after"] is not None:
            continue  # finished before the interruption
        if k == len(log["tasks"]):
            log["tasks"].append({"task": k, "size": len(forget), "epochs": [], "stop_reason": None, "success": None,
                                 "after": None})  # fmt: skip
        task = log["tasks"][k]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if saved is not None and k == running:
            _load_optimizer(model, optimizer, saved)
        while task["stop_reason"] is None:
            record = {"epoch": len(task["epochs"]) + 1}
            record.update(_train_epoch(train_model, optimizer, params, forget, retain, cfg, generator, device))
            record["train_s"] = lap("train_s")
            metrics = _measure(model, forget, cfg, limit=crit["ma"])  # EL only once MA meets its limit
            record.update(forget_ma=metrics["ma"], forget_el=metrics["el"], retain_ppl=_retain_ppl(model, retain, cfg))
            record["criterion_met"] = _met(metrics, crit)
            record["eval_s"] = lap("eval_s")
            task["epochs"].append(record)
            task["stop_reason"] = _stop_reason(record, cfg)
            if task["stop_reason"] is not None:
                task["success"] = task["stop_reason"].startswith("criterion met")
            info(
                "%s epoch %d/%d: loss forget %s retain %s | forget MA %s EL_%d %s | criterion %s | %.1f s%s",
                _set_name(k, len(tasks)), record["epoch"], cfg.max_epochs, _fmt(record["forget_loss"]),
                _fmt(record["retain_loss"]), _fmt(record["forget_ma"]), cfg.el_n, _fmt(record["forget_el"]),
                "met" if record["criterion_met"] else "not met", record["train_s"] + record["eval_s"],
                f" -> {task['stop_reason']}" if task["stop_reason"] else "",
            )  # fmt: skip
            _save_checkpoint(ckpt, model, optimizer, generator, log)
            write(out / "log.json", log)
            if on_epoch_end is not None:
                on_epoch_end(k, record)
        # every set so far (a later task may undo one); the last epoch already measured this task's set and
        # the retain perplexity on the current weights, unless it skipped EL
        last = task["epochs"][-1]  # a task runs at least one epoch
        after = [_measure(model, t, cfg) for t in tasks[:k]]
        reuse = last["forget_el"] is not None
        after.append({"ma": last["forget_ma"], "el": last["forget_el"]} if reuse else _measure(model, forget, cfg))
        task["after"] = {
            "forget": [{**metrics, "met": _met(metrics, crit)} for metrics in after],
            "heldout": None if heldout is None else _measure(model, heldout, cfg),
            "retain_ppl": last["retain_ppl"],
        }
        lap("eval_s")
        write(out / "log.json", log)

    # ---- outputs; the checkpoint goes last, so an interruption before here resumes and finishes
    final = log["tasks"][-1]["after"]["forget"]
    log["success"] = all(task["success"] for task in log["tasks"]) and all(m["met"] for m in final)
    log["outputs"] = _export(model, cfg, out, tokenizer)
    lap("export_s")
    log["status"] = "finished"
    if process.is_main:
        write_report(out / "report.md", log)
        write_plot(out / "metrics.png", log)
        write_json(out / "log.json", log)
        shutil.rmtree(ckpt)
    dist_utils.barrier()  # every rank returns once the outputs are complete
    unpatch_fused_ihl(model)
    model.train(was_training)
    info("%s: %s; outputs in %s", "SUCCESS" if log["success"] else "FAILURE", outcome(log), out)
    return UnlearnResult(model, log["success"], log, out)
