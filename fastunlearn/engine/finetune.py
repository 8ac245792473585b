"""Supervised fine-tuning (SFT): the one home of "train a causal LM on data", e.g. the TOFU target model (all
authors) and retain model (the retain split), or the demos' memorization.

``finetune(model, data, config, out_dir)`` trains every weight of ``model`` on ``data`` (a ``SequenceSet``:
question/answer rows from ``qa.tokenize_qa``, whose ``labels`` are -100 on the prompt, or plain text from
``tokenize_sequences``) for ``config.epochs`` epochs. An epoch draws a seeded permutation of the rows and cuts it
into batches of ``batch_size`` (the last one smaller when ``batch_size`` does not divide N); a batch is one
AdamW update, its gradient accumulated over micro-batches of ``micro_batch_size`` rows:

    loss(batch) = sum_{targets t in batch} -log p(y_t | y_<t) / #targets(batch)

summed per micro-batch (``objectives.retain_term``: next-token cross-entropy over the targets
``objectives.next_token_targets`` keeps, i.e. answer tokens and eos for QA) and divided by the whole batch's
target count, so the update does not depend on ``micro_batch_size`` (Hugging Face's Trainer, which TOFU uses,
averages per-micro-batch means instead). Learning rate: a linear warmup from 0 over ``warmup_epochs`` epochs
of steps, then ``schedule`` "linear" (decay to 0 at the last step, the Trainer's default) or "constant".
Weight decay applies to matrices only (ndim >= 2), not to biases and norm weights. The gradient's 2-norm is
clipped to ``max_grad_norm`` (the Trainer's default 1.0; None: no clipping).

Outputs (``OUT``, handled like :func:`fastunlearn.unlearn`'s, ``engine.outdir``): ``model/`` (a transformers
checkpoint: safetensors weights, config, tokenizer when given, written atomically) and ``log.json`` (loss,
learning rate and gradient norm per step, mean loss per epoch). After every epoch a checkpoint (weights, AdamW
state, RNG states: ``engine.checkpoint``) is written; rerun on the same model, data and config, an interrupted
run resumes from its last finished epoch and ends bit-equal (on CPU) to an uninterrupted one. One process only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastunlearn.data.labels import count_targets
from fastunlearn.data.text import SequenceSet, iterate_batches
from fastunlearn.engine import checkpoint, outdir, progress
from fastunlearn.engine.config import DTYPES
from fastunlearn.engine.evaluation import finite
from fastunlearn.engine.inputs import fingerprint
from fastunlearn.engine.params import enable_checkpointing
from fastunlearn.engine.report import write_json
from fastunlearn.lora.export import save_merged_model
from fastunlearn.losses import retain_term
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.atomic import atomic_directory
from fastunlearn.utils.validate import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positions,
    check_token_ids,
)

SCHEDULES = ("linear", "constant")
MODEL_DIR = "model"


@dataclass
class FinetuneConfig:
    """How :func:`finetune` trains (TOFU's settings by default: 5 epochs, batch 32, lr 1e-5, weight decay
    0.01, one epoch of warmup); every field is checked on construction (ValueError naming it)."""

    epochs: int = 5
    lr: float = 1e-5  # peak learning rate (after warmup)
    batch_size: int = 32  # rows per optimizer update
    micro_batch_size: int = 4  # rows per forward / backward; the update does not depend on it
    weight_decay: float = 0.01  # AdamW decoupled weight decay, on matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 1.0  # linear warmup over round(warmup_epochs x steps per epoch) steps; 0: none
    schedule: str = "linear"  # after warmup: "linear" decay to 0 at the last step, or "constant"
    max_grad_norm: float | None = 1.0  # clip the gradient's 2-norm; None: no clipping
    seed: int = 0  # data order (and dropout)
    dtype: str | None = None  # cast the model to "float32" or "bfloat16" (bf16 weights lose small updates); None: keep
    gradient_checkpointing: bool = False  # recompute activations in backward (transformers models)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed)
        check_number("lr", self.lr, 0, strict=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("eps", self.eps, 0, strict=True)
        check_number("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be <= epochs ({self.epochs}), got {self.warmup_epochs!r}")
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, 0, strict=True)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in betas)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, (None, *DTYPES))
        check_bool("gradient_checkpointing", self.gradient_checkpointing)

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


@dataclass
class FinetuneResult:
    model: nn.Module  # trained in place, in eval mode
    log: dict
    model_dir: Path  # OUT/model: the transformers checkpoint


def fmt_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def steps_per_epoch(n_rows: int, cfg: FinetuneConfig) -> int:
    return math.ceil(n_rows / cfg.batch_size)


def learning_rate(step: int, total: int, warmup: int, cfg: FinetuneConfig) -> float:
    """The learning rate of update ``step`` (1-based) of ``total``: ``lr x step / warmup`` for the first
    ``warmup`` updates, then ``lr`` ("constant") or ``lr x (total - step + 1) / (total - warmup)`` ("linear": from
    ``lr`` down to ``lr / (total - warmup)`` at the last update; the Trainer's schedule, one step earlier)."""
    if step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * max(total - step + 1, 0) / max(total - warmup, 1)


def sft_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
             micro_batch_size: int, device, max_grad_norm: float | None = None) -> dict:  # fmt: skip
    """One AdamW update on ``batch`` ({"input_ids", "attention_mask"[, "labels"]}, (B, T)): the mean next-token
    cross-entropy over the batch's targets, accumulated over micro-batches of ``micro_batch_size`` rows (each cut
    after its last real token: right padding costs no compute).
    Returns {"loss": that mean before the update (float), "grad_norm" (before clipping), "targets"}; no update
    (``"updated": False``) when the loss or gradient is not finite."""
    term = retain_term()  # summed over a micro-batch's next-token targets
    n = int(count_targets(batch["input_ids"], batch["attention_mask"], batch.get("labels")))
    if n == 0:
        raise ValueError("a batch has no next-token targets (every label is -100 or padding)")
    optimizer.zero_grad(set_to_none=True)
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    rows = len(batch["input_ids"])
    for start in range(0, rows, micro_batch_size):
        micro = {k: v[start : start + micro_batch_size] for k, v in batch.items()}
        real = micro["attention_mask"].any(0).nonzero()  # columns with a real token in some row
        width = max(int(real.max()) + 1 if len(real) else 0, 2)  # drop trailing padding only (causal: the kept
        micro = {k: v[:, :width].to(device) for k, v in micro.items()}  # positions' logits are unchanged)
        loss_sum = term(model, micro)  # (): summed cross-entropy of this micro-batch's targets
        (loss_sum / n).backward()
        total += loss_sum.detach().double()
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    loss, norm = (total / n).item(), norm.item()
    updated = math.isfinite(loss) and math.isfinite(norm)
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": norm, "targets": n, "updated": updated}


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on those with ndim >= 2 (matrices, embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def data_fingerprint(data: SequenceSet) -> str:
    """sha256 of the rows and labels (a resume must be given the same data)."""
    labels = data.labels if data.labels is not None else torch.zeros(0, dtype=torch.int64)
    return fingerprint([data, SequenceSet(labels.reshape(1, -1), torch.ones_like(labels).reshape(1, -1),
                                          torch.zeros(1, dtype=torch.int64))])  # fmt: skip


def _check_inputs(model, data, config) -> None:
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not isinstance(data, SequenceSet):
        raise ValueError(f"data must be a SequenceSet (qa.tokenize_qa, data.tokenize_sequences), got "
                         f"{type(data).__name__}")  # fmt: skip
    if len(data) == 0 or int(count_targets(data.input_ids, data.attention_mask, data.labels)) == 0:
        raise ValueError("data has no next-token targets to train on")
    check_token_ids("data", data.input_ids, model)
    check_positions("data's rows (seq_len)", data.input_ids.shape[-1], model)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"model must be a transformers PreTrainedModel (it is saved with save_pretrained), got "
                         f"{type(model).__name__}")  # fmt: skip
    if dist_utils.current().distributed:
        raise ValueError("finetune runs in one process; launch it without torchrun")


def _new_log(model: nn.Module, data: SequenceSet, cfg: FinetuneConfig, steps: int, warmup: int,
             fingerprint: str | None) -> dict:  # fmt: skip
    return {
        "status": "running",
        "config": cfg.to_dict(),
        "data": {
            "rows": len(data),
            "seq_len": data.seq_len,
            "labels": data.labels is not None,
            "targets": int(count_targets(data.input_ids, data.attention_mask, data.labels)),
            "fingerprint": data_fingerprint(data),
        },
        "model": {
            "class": type(model).__name__,
            "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
            "fingerprint": fingerprint,  # inputs.model_fingerprint of the model as given
        },
        "steps_per_epoch": steps,
        "total_steps": steps * cfg.epochs,
        "warmup_steps": warmup,
        "steps": [],  # {"step", "epoch", "lr", "loss", "grad_norm", "updated"} per update
        "epochs": [],  # {"epoch", "loss" (target-weighted mean of the epoch's steps), "seconds"}
        "resumes": 0,
        "outputs": None,
        "seconds": 0.0,
    }


def _check_resume(log: dict, data: SequenceSet, cfg: FinetuneConfig) -> None:
    if log.get("config") != cfg.to_dict():
        diff = sorted(k for k in cfg.to_dict() if log.get("config", {}).get(k) != cfg.to_dict()[k])
        raise ValueError(f"the checkpoint in out_dir was made with a different config (fields {diff}): cannot resume")
    if log["data"]["fingerprint"] != data_fingerprint(data):
        raise ValueError("the checkpoint in out_dir was made with different data: cannot resume")


def _finished_differs(log: dict, fingerprint: str, data: SequenceSet, cfg: FinetuneConfig) -> str | None:
    """What differs between a finished fine-tuning's log and this one (config, data, model), or None."""
    if log["config"] != cfg.to_dict():
        return f"config (fields {sorted(k for k in cfg.to_dict() if log['config'].get(k) != cfg.to_dict()[k])})"
    if log["data"]["fingerprint"] != data_fingerprint(data):
        return "data"
    return None if log["model"].get("fingerprint") == fingerprint else "model"


def finetune(
    model: nn.Module,
    data: SequenceSet,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    tokenizer=None,
    resume: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune every weight of ``model`` (trained in place, on its device) on ``data`` (see the module
    docstring) and write ``out_dir/model`` (+ ``tokenizer``) and ``out_dir/log.json``.

    ``out_dir`` must be missing, empty, or hold the checkpoint of an interrupted run (resumed when ``resume``:
    pass the same model as first given, data and config; each is checked). Refusals are one-line ValueErrors
    (``outdir.OutDirError``, ``checkpoint.CheckpointError``) before any compute. ``on_epoch_end(epoch,
    record)`` runs after each epoch's checkpoint is written (epoch 1-based). ``out_dir`` holding this fine-tuning
    finished (same model, data and config) raises ``outdir.RunFinished`` and changes nothing.
    """
    cfg = config
    _check_inputs(model, data, cfg)
    out = Path(out_dir)
    process = dist_utils.current()
    prepared = checkpoint.prepare_out_dir_on_all_ranks(
        out, resume, process, model, lambda log, fp: _finished_differs(log, fp, data, cfg)
    )
    try:
        return _run(model, data, cfg, out, tokenizer, prepared, on_epoch_end)
    finally:
        if prepared.lock is not None:
            prepared.lock.release()


def _run(model, data, cfg: FinetuneConfig, out: Path, tokenizer, prepared, on_epoch_end) -> FinetuneResult:
    start = time.perf_counter()
    steps = steps_per_epoch(len(data), cfg)
    warmup = round(cfg.warmup_epochs * steps)
    log = prepared.log
    if log is not None:
        _check_resume(log, data, cfg)
        log["resumes"] += 1
    else:
        log = _new_log(model, data, cfg, steps, warmup, prepared.fingerprint)
    before = log["seconds"]
    if cfg.dtype is not None:
        model.to(DTYPES[cfg.dtype])
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = make_optimizer(model, cfg)
    if prepared.saved is not None:
        checkpoint.load_params_and_rng(model, prepared.saved, generator)
        checkpoint.load_optimizer(model, optimizer, prepared.saved)
        progress.info("finetune: resuming after epoch %d of %d", len(log["epochs"]), cfg.epochs)
    total = steps * cfg.epochs
    for epoch in range(len(log["epochs"]) + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        bar = progress.Progress(f"finetune: epoch {epoch}/{cfg.epochs}", steps)
        weighted, targets = 0.0, 0
        for i, batch in enumerate(iterate_batches(data, cfg.batch_size, shuffle=True, generator=generator)):
            step = (epoch - 1) * steps + i + 1
            lr = learning_rate(step, total, warmup, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            record = sft_step(model, optimizer, batch, cfg.micro_batch_size, device, cfg.max_grad_norm)
            if record["updated"]:
                weighted, targets = weighted + record["loss"] * record["targets"], targets + record["targets"]
            record.update(loss=finite(record["loss"]), grad_norm=finite(record["grad_norm"]))  # JSON: None if not
            log["steps"].append({"step": step, "epoch": epoch, "lr": lr, **record})
            bar.step()
        seconds = time.perf_counter() - epoch_start
        summary = {"epoch": epoch, "loss": weighted / targets if targets else None, "seconds": seconds}
        log["epochs"].append(summary)
        log["seconds"] = before + time.perf_counter() - start
        skipped = sum(not s["updated"] for s in log["steps"] if s["epoch"] == epoch)
        progress.info("finetune: epoch %d/%d, loss %s, %.0f s%s", epoch, cfg.epochs, fmt_loss(summary["loss"]), seconds,
                      f", {skipped} updates skipped (loss or gradient not finite)" if skipped else "")  # fmt: skip
        checkpoint.save_checkpoint(out, model, optimizer, generator, log, prepared.fingerprint)
        write_json(out / "log.json", log)  # after the checkpoint: a log.json in OUT means there is one to resume
        if on_epoch_end is not None:
            on_epoch_end(epoch, summary)
    model.eval()
    with atomic_directory(out / MODEL_DIR, keep=True) as tmp:  # a file of yours in OUT/model stays
        save_merged_model(model, tmp, overwrite=True)  # no adapters: the model's own weights
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log["outputs"] = {"model": MODEL_DIR, "log": "log.json"}
    log["status"] = "finished"
    log["seconds"] = before + time.perf_counter() - start
    write_json(out / "log.json", log)
    checkpoint.remove_checkpoints(out)
    outdir.remove_private(out)
    last = fmt_loss(log["epochs"][-1]["loss"])
    progress.info("finetune: done, %d steps, final epoch loss %s; model in %s", total, last, out / MODEL_DIR)
    return FinetuneResult(model, log, out / MODEL_DIR)
