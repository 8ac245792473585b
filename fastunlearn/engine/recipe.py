"""The unlearning run as a recipe: ``setup`` (trained parameters, baseline or checkpoint), ``train`` (the tasks,
one update per epoch until the stop rule), ``save`` (models, report, plot). :func:`unlearn` runs all three.

The recipe holds the state a run carries from step to step; what each step does lives in its own module:
``params`` (what trains), ``epoch`` (one update), ``evaluation`` (metrics, criterion, stop rule),
``checkpoint`` (resume), ``outputs`` (files); the log it fills is ``runlog.RunLog`` (``log.json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import checkpoint, deploy, evaluation, outdir, parallel, progress
from fastunlearn.engine import reference as npo_reference
from fastunlearn.engine.cache import HeldoutCache
from fastunlearn.engine.config import DTYPES, UnlearnConfig, UnlearnResult
from fastunlearn.engine.epoch import train_epoch
from fastunlearn.engine.inputs import check_data, check_model, data_fingerprint, set_name, utility_sets
from fastunlearn.engine.outputs import check_outputs, export_models, write_documents
from fastunlearn.engine.params import enable_checkpointing, fisher_sample, setup_params
from fastunlearn.engine.report import check_plotting, outcome, write_json
from fastunlearn.engine.runlog import (
    Baseline,
    BaselineCache,
    DataInfo,
    EpochRecord,
    ModelInfo,
    RunLog,
    TaskAfter,
    TaskLog,
    Timings,
)
from fastunlearn.fused_lm import patch_fused_ihl, unpatch_fused_ihl
from fastunlearn.lora.layer import trainable_parameters
from fastunlearn.losses import forget_term, retain_term
from fastunlearn.utils import distributed as dist_utils

logger = logging.getLogger("fastunlearn.engine")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class Clock:
    """Seconds per phase, added into the log's :class:`Timings` (a resumed run adds to the interrupted one's)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.before = 0.0  # total_s of the sessions before this one

    def lap(self, timings: Timings, phase: str) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        timings.add(phase, seconds)
        timings.total_s = self.before + now - self.start
        return seconds


def new_log(model: nn.Module, cfg: UnlearnConfig, tasks, retain, heldout, utility, device,
            fingerprint: str | None = None) -> RunLog:  # fmt: skip
    trainable, total, percent = trainable_parameters(model)
    data = DataInfo(
        forget=[len(t) for t in tasks],
        retain=None if retain is None else len(retain),
        heldout=None if heldout is None else len(heldout),
        seq_len=tasks[0].seq_len,
        utility={name: len(seqs) for name, seqs in utility.items()} or None,
        fingerprint=data_fingerprint(tasks, retain, heldout, utility),
        # how many retain sequences the perplexity and FILA's retain Fisher use (seeded samples)
        retain_ppl_sequences=len(evaluation.ppl_sample(retain, cfg)) if cfg.eval_retain_ppl else None,
        fisher_retain_sequences=len(fisher_sample(retain, cfg)) if cfg.params == "fila" else None,
        utility_ppl_sequences={name: len(evaluation.ppl_sample(s, cfg)) for name, s in utility.items()} or None,
    )
    info = ModelInfo(
        class_name=type(model).__name__,
        name_or_path=getattr(getattr(model, "config", None), "name_or_path", None),
        device=str(device),
        trainable_params=trainable,
        total_params=total,
        trainable_percent=percent,
        fingerprint=fingerprint,
    )
    return RunLog(status="running", config=cfg.to_dict(), learning_rate=cfg.learning_rate, data=data, model=info)


def check_resume(log: RunLog, cfg: UnlearnConfig, tasks, retain, heldout, utility) -> None:
    if log.config != cfg.to_dict():
        diff = sorted(k for k in log.config if log.config[k] != cfg.to_dict().get(k))
        raise ValueError(f"the checkpoint in out_dir was made with a different config (fields {diff}): cannot resume")
    if log.data.fingerprint != data_fingerprint(tasks, retain, heldout, utility):
        raise ValueError("the checkpoint in out_dir was made with different data (forget, retain, held-out or "
                         "utility sets): cannot resume")  # fmt: skip


def finished_differs(log: dict, fingerprint: str, cfg: UnlearnConfig, tasks, retain, heldout, utility) -> str | None:
    """What differs between a finished run's log and this run (config, data, model), or None: the same run."""
    config = cfg.to_dict()
    if log["config"] != config:
        return (
            f"config (fields {sorted(k for k in {*log['config'], *config} if log['config'].get(k) != config.get(k))})"
        )
    if log["data"]["fingerprint"] != data_fingerprint(tasks, retain, heldout, utility):
        return "data (forget, retain, held-out or utility sets)"
    if log["model"].get("fingerprint") != fingerprint:
        return "model" if log["model"].get("fingerprint") else "model, or a log.json without the model's fingerprint"
    return None


class UnlearnRecipe:
    """One unlearning run on ``model`` (trained in place), written to ``out_dir``; see :func:`unlearn`, which
    calls ``setup``, ``train``, ``save`` and, however they end, ``close`` (releases ``out_dir``)."""

    def __init__(self, model: nn.Module, data, config: UnlearnConfig, out_dir: str | Path, *, tokenizer=None,
                 resume: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
                 evaluate_each_epoch: evaluation.EpochHook | None = None,
                 on_epoch: evaluation.EpochHook | None = None) -> None:  # fmt: skip
        if not isinstance(config, UnlearnConfig):
            raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
        self.model, self.cfg, self.out = model, config, Path(out_dir)
        self.tokenizer, self.resume, self.on_epoch_end = tokenizer, resume, on_epoch_end
        self.evaluate_each_epoch = evaluation.evaluation_hook(evaluate_each_epoch, on_epoch)  # on_epoch: deprecated
        self.tasks, self.retain, self.heldout = check_data(data, config)
        self.utility = utility_sets(data)  # {name: text never trained on}; perplexity measured like the retain set's
        self.process = dist_utils.current()
        self.clock = Clock()
        self.log: RunLog | None = None
        self.saved: dict | None = None  # the checkpoint's tensors when resuming
        self.last_train_s: float | None = None  # the last epoch's training time in this session
        self.lock = None  # rank 0's hold on out_dir, from setup to close
        self.fingerprint: str | None = None  # model_fingerprint of the model as given (rank 0), in each checkpoint

    def info(self, *args) -> None:
        if self.process.is_main:
            logger.info(*args)

    def write_log(self) -> None:
        if self.process.is_main:
            write_json(self.out / "log.json", self.log.to_dict())

    def lap(self, key: str) -> float:
        return self.clock.lap(self.log.timings, key)

    # ---- setup: dtype, trained parameters, seeds; then the baseline (fresh run) or the checkpoint (resume)
    def setup(self) -> None:
        cfg, model = self.cfg, self.model
        check_plotting()
        check_model(
            model, self.tasks, self.retain, self.heldout, self.utility
        )  # NaN weights, token ids: before any compute
        deploy.check_template(model, cfg)  # merged.gguf can be written like gguf_template
        self.deploy, self.quant_aware = deploy.setup(model, cfg)  # before adapters: the model's own names
        prepared = checkpoint.prepare_out_dir_on_all_ranks(self.out, self.resume, self.process, model, self.same_run)
        self.lock, self.fingerprint = prepared.lock, prepared.fingerprint  # rank 0's
        check_outputs(self.out, cfg, self.process)  # a resumed run's merged.gguf: replaced only if it is its own
        self.saved = prepared.saved
        self.log = None if prepared.log is None else RunLog.from_dict(prepared.log)  # read as the checkpoint loaded
        if self.log is not None:
            check_resume(self.log, cfg, self.tasks, self.retain, self.heldout, self.utility)
            self.clock.before = self.log.timings.total_s
        self.was_training = model.training
        model.to(DTYPES[cfg.dtype])
        self.reference = npo_reference.forget_reference(model, self.tasks, cfg, self.saved)  # NPO: before adapters
        cached = self.saved is None and cfg.cache_heldout_baseline and self.heldout is not None
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # data order
        setup_params(model, cfg, self.tasks[0], self.retain, self.saved)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if self.saved is not None:
            checkpoint.load_params_and_rng(model, self.saved, self.generator)  # full tensors: before FSDP shards
        if cfg.fused_ihl:
            patch_fused_ihl(model)  # before wrapping: DDP / FSDP call the patched forward
        self.forget_term = forget_term(cfg.forget_loss, fused=cfg.fused_ihl, **cfg.objective_options())
        self.retain_term = retain_term(fused=cfg.fused_ihl)
        self.train_model = parallel.wrap(model, cfg.parallel, next(model.parameters()).device)
        self.device = next(model.parameters()).device  # FSDP moves a CPU model to this rank's GPU as it shards
        self.params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in shards
        if self.saved is None:
            self.log = new_log(model, cfg, self.tasks, self.retain, self.heldout, self.utility, self.device,
                               self.fingerprint)  # fmt: skip
            self.lap("setup_s")
            cache = HeldoutCache(self.fingerprint, self.heldout, cfg, self.device) if cached else None
            before, self.log.criterion, source = evaluation.baseline(
                model, cfg, self.tasks, self.retain, self.heldout, cache, self.utility
            )
            self.log.baseline = Baseline(**before)
            self.log.baseline_cache = None if source is None else BaselineCache(**source)
            if self.deploy is not None:
                variant = self.deploy.cache_variant()
                cache = HeldoutCache(self.fingerprint, self.heldout, cfg, self.device, variant) if cached else None
                self.log.deploy = self.deploy.baseline(model, self.tasks, self.heldout, cache)
            if self.evaluate_each_epoch is not None:  # epoch 0: the model as given (adapters that change nothing yet)
                self.log.baseline.on_epoch = evaluation.call_hook(self.evaluate_each_epoch, model, 0)
            self.lap("baseline_s")
            self.save_checkpoint(None)  # a resume skips the setup (FILA's Fisher) and the baseline
        else:
            self.log.resumes += 1
            if self.deploy is not None:
                self.deploy.limits = self.log.deploy.criterion
            self.lap("setup_s")
        self.write_log()
        crit, counts = self.log.criterion, self.log.model
        self.info(
            "params=%s: %d of %d parameters trainable (%.3f%%), lr %g | criterion (%s): forget MA <= %s, EL_%d <= %s%s",
            cfg.params, counts.trainable_params, counts.total_params, counts.trainable_percent,
            cfg.learning_rate, cfg.stop, _fmt(crit["ma"]), cfg.el_n, _fmt(crit["el"]),
            " | resumed from the checkpoint" if self.saved else "",
        )  # fmt: skip

    def same_run(self, log: dict, fingerprint: str) -> str | None:
        return finished_differs(log, fingerprint, self.cfg, self.tasks, self.retain, self.heldout, self.utility)

    def save_checkpoint(self, optimizer) -> None:
        checkpoint.save_checkpoint(self.out, self.model, optimizer, self.generator, self.log.to_dict(),
                                   self.fingerprint, extra=npo_reference.reference_tensors(self.reference))  # fmt: skip

    # ---- the tasks (one unless continual), each epoch one update, until the stop rule
    def train(self) -> None:
        log, cfg = self.log, self.cfg
        running = len(log.tasks) - 1  # the task whose optimizer state the checkpoint holds (-1: none)
        for k, forget in enumerate(self.tasks):
            if k < len(log.tasks) and log.tasks[k].after is not None:
                continue  # finished before the interruption
            if k == len(log.tasks):
                log.tasks.append(TaskLog(task=k, size=len(forget)))
            optimizer = torch.optim.AdamW(
                self.params, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
            )
            if self.saved is not None and k == running:
                checkpoint.load_optimizer(self.model, optimizer, self.saved)
            while log.tasks[k].stop_reason is None:
                self.run_epoch(k, forget, optimizer)
            self.measure_after_task(k, forget)

    def run_epoch(self, k: int, forget: SequenceSet, optimizer) -> None:
        cfg, task, crit = self.cfg, self.log.tasks[k], self.log.criterion
        epoch = len(task.epochs) + 1
        phase = f"{set_name(k, len(self.tasks))} epoch {epoch}/{cfg.max_epochs}"
        last_s = self.last_train_s
        if last_s is None or last_s >= progress.EVERY_S:  # no "epoch e/max:" here: that is the epoch's own line
            eta = "" if last_s is None else f", ETA {last_s:.0f} s (as the last epoch)"
            self.info("%s training: %d forget sequences in micro-batches of %d%s", phase, len(forget),
                      cfg.micro_batch_size, eta)  # fmt: skip
        reference = None if self.reference is None else self.reference[k]
        weights = deploy.quant_aware_weights(self.quant_aware, self.model)  # quant_aware: straight-through
        record = EpochRecord(epoch, **train_epoch(self.train_model, self.forget_term, self.retain_term, optimizer,
                                                  self.params, forget, self.retain, cfg, self.generator, self.device,
                                                  reference=reference, weights=weights))  # fmt: skip
        record.train_s = self.last_train_s = self.lap("train_s")
        phase += " evaluation:"
        metrics = evaluation.measure(self.model, forget, cfg, limit=crit["ma"], phase=phase)  # EL once MA meets it
        record.forget_ma, record.forget_el = metrics["ma"], metrics["el"]
        if evaluation.ppl_due(cfg, epoch):  # else only before unlearning and after the task
            record.retain_ppl, record.utility_ppl = evaluation.retain_and_utility_ppl(
                self.model, self.retain, self.utility, cfg, phase
            )
        if self.evaluate_each_epoch is not None:
            record.on_epoch = evaluation.call_hook(self.evaluate_each_epoch, self.model, epoch)
        record.criterion_met = evaluation.criterion_met(metrics, crit)
        if self.deploy is not None:  # the deployed model too, where it can decide (engine.deploy)
            record.deploy = self.deploy.epoch(self.model, forget, record.criterion_met, phase)
            record.criterion_met = record.criterion_met and (record.deploy is None or record.deploy["met"])
        record.eval_s = self.lap("eval_s")
        task.epochs.append(record)
        task.stop_reason = evaluation.stop_reason(record, cfg)
        if task.stop_reason is not None:
            task.success = evaluation.task_success(record, cfg)
        hook = "".join(f" {name} {_fmt(value)}" for name, value in (record.on_epoch or {}).items())
        if record.deploy is not None:
            values = record.deploy
            hook += f" | {cfg.deploy_quant.upper()} MA {_fmt(values['ma'])} EL_{cfg.el_n} {_fmt(values['el'])}"
        self.info(
            "%s epoch %d/%d: loss forget %s retain %s | forget MA %s EL_%d %s | criterion %s%s | %.1f s%s",
            set_name(k, len(self.tasks)), epoch, cfg.max_epochs, _fmt(record.forget_loss), _fmt(record.retain_loss),
            _fmt(record.forget_ma), cfg.el_n, _fmt(record.forget_el),
            {True: "met", False: "not met", None: "-"}[record.criterion_met], hook and f" |{hook}",
            record.train_s + record.eval_s, f" -> {task.stop_reason}" if task.stop_reason else "",
        )  # fmt: skip
        self.save_checkpoint(optimizer)
        self.write_log()
        if self.on_epoch_end is not None:
            self.on_epoch_end(k, record.to_dict())

    def measure_after_task(self, k: int, forget: SequenceSet) -> None:
        """Every forget set so far (a later task may undo one), the held-out set (its EL only if
        ``eval_heldout_el_after``), the retain and utility perplexities; the last epoch already measured this task's
        set on the current weights (unless it skipped EL) and the perplexities if they were due (``eval_every``)."""
        cfg, task, crit = self.cfg, self.log.tasks[k], self.log.criterion
        last = task.epochs[-1]  # a task runs at least one epoch
        names = [set_name(i, len(self.tasks)) for i in range(k + 1)]
        after = [evaluation.measure(self.model, t, cfg, phase=f"after {names[k]}: {names[i]}")
                 for i, t in enumerate(self.tasks[:k])]  # fmt: skip
        reuse = last.forget_el is not None or cfg.stop == "epochs"  # stop="epochs": MA only
        after.append({"ma": last.forget_ma, "el": last.forget_el} if reuse else
                     evaluation.measure(self.model, forget, cfg, phase=f"after {names[k]}: {names[k]}"))  # fmt: skip
        heldout = None
        if self.heldout is not None:
            heldout = evaluation.measure(self.model, self.heldout, cfg, el=cfg.eval_heldout_el_after,
                                         phase=f"after {names[k]}: held-out set")  # fmt: skip
        retain_ppl, utility_ppl = last.retain_ppl, last.utility_ppl
        if not evaluation.ppl_due(cfg, last.epoch):
            retain_ppl, utility_ppl = evaluation.retain_and_utility_ppl(self.model, self.retain, self.utility, cfg,
                                                                        phase=f"after {names[k]}:")  # fmt: skip
        task.after = TaskAfter(
            forget=[{**metrics, "met": evaluation.criterion_met(metrics, crit)} for metrics in after],
            heldout=heldout,  # "el": None unless eval_heldout_el_after
            retain_ppl=retain_ppl,
            utility_ppl=utility_ppl,
        )
        if self.deploy is not None:
            task.after.deploy = self.deploy.after_task(self.model, self.tasks[: k + 1], self.heldout, last.deploy,
                                                       f"after {names[k]}")  # fmt: skip
        self.lap("eval_s")
        self.write_log()

    # ---- outputs; the checkpoint goes last, so an interruption before here resumes and finishes
    def save(self) -> UnlearnResult:
        log = self.log
        final = log.tasks[-1].after.forget
        if log.tasks[-1].after.deploy is not None:  # deploy_quant: the deployed model must still meet it too
            final = [*final, *log.tasks[-1].after.deploy["forget"]]
        log.success = all(task.success for task in log.tasks) and all(m["met"] is not False for m in final)
        log.outputs = export_models(self.model, self.cfg, self.out, self.tokenizer)
        self.lap("export_s")
        log.status = "finished"
        document = log.to_dict()
        if self.process.is_main:
            write_documents(self.out, document)
            checkpoint.remove_checkpoints(self.out)
            outdir.remove_private(self.out)
        dist_utils.barrier()  # every rank returns once the outputs are complete
        self.close()
        unpatch_fused_ihl(self.model)
        self.model.train(self.was_training)
        self.info("%s: %s; outputs in %s", "SUCCESS" if log.success else "FAILURE", outcome(document), self.out)
        return UnlearnResult(self.model, log.success, document, self.out)

    def close(self) -> None:
        """Release out_dir (rank 0's lock); :func:`unlearn` calls it however the run ends."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def unlearn(
    model: nn.Module,
    data: UnlearningData | Sequence[SequenceSet],
    config: UnlearnConfig,
    out_dir: str | Path,
    *,
    tokenizer=None,
    resume: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    evaluate_each_epoch: evaluation.EpochHook | None = None,
    on_epoch: evaluation.EpochHook | None = None,
) -> UnlearnResult:
    """Unlearn ``data``'s forget set(s) from ``model`` (trained in place) and write the run to ``out_dir``.

    ``data``: an :class:`UnlearningData`; its ``forget`` may be a list of SequenceSets (continual unlearning,
    e.g. from ``split_tasks``), sharing its retain and held-out sets; or a plain list of forget SequenceSets
    (no retain or held-out set: needs ``retain_weight=0``, ``params`` other than "fila", ``stop="threshold"`` or
    ``"epochs"``).
    ``out_dir`` must be empty or missing, unless it holds the checkpoint of an interrupted run and ``resume``
    (then pass the same, unmodified model, data and config: each is checked); it is locked while the run
    lasts. Refusals are one-line errors (``outdir.OutDirError``, ``checkpoint.CheckpointError``, ValueError)
    raised before any compute. ``out_dir`` holding this run finished (same model, data and config: a rerun)
    raises ``outdir.RunFinished`` (an OutDirError; its ``log`` is the finished run's) and changes nothing.
    ``tokenizer`` is saved with the merged model.
    Two hooks, one of each kind:

    - ``on_epoch_end(task_index, epoch_record)``: a callback (progress, early interruption) run after each epoch's
      checkpoint is written; what it returns is ignored (``finetune`` has the same hook).
    - ``evaluate_each_epoch(model, epoch) -> {name: float}``: an evaluation of your own (TOFU's forget quality and
      model utility), run in eval mode without gradients once before unlearning (epoch 0, into
      ``log["baseline"]``) and after every epoch's update (epoch = the task's epoch number, into that epoch's
      record), both under the key ``"on_epoch"`` (a non-finite value is recorded as None); the report's epoch
      table and plot show the values. Multi-process: every rank calls it (FSDP forwards need them all); rank 0's
      values are written. ``on_epoch`` is its former name: still accepted, with a DeprecationWarning.
    """
    hook = evaluation.evaluation_hook(evaluate_each_epoch, on_epoch)  # the warning points at the caller
    recipe = UnlearnRecipe(model, data, config, out_dir, tokenizer=tokenizer, resume=resume,
                           on_epoch_end=on_epoch_end, evaluate_each_epoch=hook)  # fmt: skip
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.close()
