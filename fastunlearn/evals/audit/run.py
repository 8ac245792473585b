"""``audit()``: check the inputs, measure the float model once, run the chosen probes, write the report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastunlearn.evals.audit import report as report_io
from fastunlearn.evals.audit.config import AuditConfig
from fastunlearn.evals.audit.measure import Steps, as_set, check_tokens, ma_el, means, sample
from fastunlearn.evals.audit.membership import probe_membership
from fastunlearn.evals.audit.quantization import check_formats, probe_quantization
from fastunlearn.evals.audit.relearning import probe_relearning
from fastunlearn.lora.layer import LoRALinear


@dataclass
class AuditResult:
    """What :func:`audit` found: ``passed`` (every probe passed), ``report`` (what ``audit.json`` holds: the
    verdicts, every value, the settings) and the files written (None without ``out_dir``)."""

    passed: bool
    report: dict
    json_path: Path | None = None
    markdown_path: Path | None = None

    @property
    def verdicts(self) -> dict[str, str]:
        """{probe: its one-line verdict, "PASSED: ..." or "FAILED: ..."}."""
        return self.report["verdicts"]

    def to_markdown(self) -> str:
        return report_io.to_markdown(self.report)


def _check_model(name: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{name} has LoRA adapters: audit the model as deployed, with the adapters merged "
                         "(the engine's merged/ model, or fastunlearn.save_merged_model)")  # fmt: skip
    for pname, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.detach()).all()):
            raise ValueError(f"{name} parameter {pname!r} has NaN or inf values")


def _name(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def audit(
    model: nn.Module, forget, heldout, *, reference: nn.Module | None = None, retain=None,
    retrain: nn.Module | None = None, tokenizer=None, gguf: str | os.PathLike | None = None,
    config: AuditConfig | None = None, out_dir: str | os.PathLike | None = None,
) -> AuditResult:  # fmt: skip
    """Does the forgetting hold? Run the probes of ``config`` (``fastunlearn.evals.audit``) on ``model`` (the
    unlearned model, with its adapters merged) and return an :class:`AuditResult`; with ``out_dir``, also write
    ``audit.json`` and ``audit.md`` there.

    ``forget``, ``heldout``, ``retain``: ``SequenceSet`` s or (N, T) token ids (a seeded sample of at most
    ``config.max_sequences`` rows of each is used). ``reference``: the model before unlearning (the held-out level
    and the pre-unlearning MA / EL come from it); ``retrain``: a model trained without the forget set (PrivLeak's
    target); ``retain``: text for the benign fine-tune; ``tokenizer``: for the zlib score; ``gguf``: a GGUF file
    whose per-tensor types are audited too (the file the model came from, or the one it will be written like).
    Every check runs before any compute. The caller's models end as they were given: the quantization probe
    round-trips the weights in place and restores them bit for bit (also on an error), relearning trains copies.
    """
    start = time.perf_counter()
    cfg = config if config is not None else AuditConfig()
    if not isinstance(cfg, AuditConfig):
        raise TypeError(f"config must be an AuditConfig, got {type(cfg).__name__}")
    for name, m in (("model", model), ("reference", reference), ("retrain", retrain)):
        if m is not None or name == "model":
            _check_model(name, m)
    sets = {"forget": as_set("forget", forget), "heldout": as_set("heldout", heldout)}
    if retain is not None:
        sets["retain"] = as_set("retain", retain)
    sets = {name: sample(seqs, cfg.max_sequences, cfg.seed) for name, seqs in sets.items()}
    for name, seqs in sets.items():
        role = {"forget": "forget set", "heldout": "held-out set", "retain": "retain set"}[name]
        for m in (model, reference, retrain):
            if m is not None:
                check_tokens(role, seqs, m)
        if name != "retain":
            seqs.check_el_length(role, cfg.el_n)
    forget_set, heldout_set, retain_set = sets["forget"], sets["heldout"], sets.get("retain")
    if "relearning" in cfg.probes:
        for role, seqs in (("forget set", forget_set), ("held-out set", heldout_set)):
            if len(seqs) <= cfg.relearn_rows:
                raise ValueError(f"relearn_rows={cfg.relearn_rows} leaves no {role} row to score: it has {len(seqs)}")
        if retain_set is not None and len(retain_set) < cfg.relearn_rows:
            raise ValueError(f"relearn_rows={cfg.relearn_rows} but the retain set has {len(retain_set)} rows")
    if "quantization" in cfg.probes:
        check_formats(model, cfg.formats)
        if reference is not None:
            check_formats(reference, cfg.formats, "reference")
    gguf_plan = None
    if gguf is not None and "quantization" in cfg.probes:
        from fastunlearn.gguf_io import formats_like

        ref_map = formats_like(reference, gguf) if reference is not None else None
        gguf_plan = (Path(gguf).name, formats_like(model, gguf), ref_map)
    out = report_io.check_out_dir(out_dir) if out_dir is not None else None

    measured = bool({"quantization", "relearning"} & set(cfg.probes))  # MA and EL: membership needs neither
    n_steps = measured + (len(cfg.formats) + (gguf_plan is not None) if "quantization" in cfg.probes else 0)
    if "relearning" in cfg.probes:
        n_steps += cfg.relearn_trials * (2 + (retain_set is not None))
    if "membership" in cfg.probes:
        n_steps += 1 + (reference is not None) + (retrain is not None)
    steps = Steps(n_steps)
    float_start = time.perf_counter()
    values, criterion, limits, float_row = {}, None, None, None
    if measured:
        steps.start("float model: MA and EL of the forget and held-out sets")
        values = {"forget": ma_el(model, forget_set, cfg.el_n, cfg.batch_size),
                  "heldout": ma_el(model, heldout_set, cfg.el_n, cfg.batch_size)}  # fmt: skip
        if reference is not None:
            values["heldout_reference"] = ma_el(reference, heldout_set, cfg.el_n, cfg.batch_size)
            if "relearning" in cfg.probes:
                values["forget_reference"] = ma_el(reference, forget_set, cfg.el_n, cfg.batch_size)
        steps.done()
        criterion = means(values["heldout_reference" if reference is not None else "heldout"])
        limits = dict(criterion)
        criterion["from"] = f"the held-out set on the {'reference' if reference is not None else 'model'}"
        float_row = {"forget": means(values["forget"]), "heldout": means(values["heldout"]),
                     "seconds": time.perf_counter() - float_start}  # fmt: skip

    result: dict = {
        report_io.MARKER_KEY: 1,
        "model": _name(model),
        "reference": _name(reference),
        "retrain": _name(retrain),
        "gguf": None if gguf is None else str(gguf),
        "config": cfg.to_dict(),
        "sets": {name: len(sets[name]) if name in sets else None for name in ("forget", "heldout", "retain")},
        "criterion": criterion,  # None: no probe measures MA and EL
        "float": float_row,
    }
    probes = {
        "quantization": lambda: probe_quantization(model, forget_set, heldout_set, cfg, values, steps,
                                                   reference=reference, gguf=gguf_plan),
        "relearning": lambda: probe_relearning(model, forget_set, heldout_set, cfg, values, limits, steps,
                                               retain=retain_set),
        "membership": lambda: probe_membership(model, forget_set, heldout_set, cfg, steps, tokenizer=tokenizer,
                                               reference=reference, retrain=retrain),
    }  # fmt: skip
    for probe in cfg.probes:
        probe_start = time.perf_counter()
        result[probe] = probes[probe]()
        result[probe]["seconds"] = time.perf_counter() - probe_start
    result["verdicts"] = {probe: result[probe]["verdict"] for probe in cfg.probes}
    result["passed"] = all(result[probe]["passed"] for probe in cfg.probes)
    result["seconds"] = time.perf_counter() - start
    paths = report_io.write(out, result) if out is not None else (None, None)
    return AuditResult(result["passed"], result, *paths)
