"""What a finished run leaves: ``adapter/`` (PEFT), ``merged/`` (transformers), the report, plot and log."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fastunlearn.engine import parallel
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.report import write_json, write_plot, write_report
from fastunlearn.lora.export import save_merged_model, save_peft_adapter
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.atomic import atomic_directory

OUTPUTS = {"merged": "merged", "report": "report.md", "plot": "metrics.png"}


def export_models(model: nn.Module, cfg: UnlearnConfig, out: Path, tokenizer) -> dict[str, str]:
    """adapter/ (PEFT, for the unmodified base model) and merged/ (a plain transformers model + tokenizer),
    written by rank 0 (from a CPU copy of the full weights under FSDP; every rank must call)."""
    if parallel.is_sharded(model):
        model = parallel.cpu_replica(model)
    outputs = dict(OUTPUTS)
    if cfg.params != "full":
        outputs["adapter"] = "adapter"
    if not dist_utils.current().is_main:
        return outputs
    if cfg.params != "full":  # keep=True: a file of yours in adapter/ or merged/ stays (engine.outdir)
        with atomic_directory(out / "adapter", keep=True) as tmp:
            save_peft_adapter(model, tmp, overwrite=True)
    with atomic_directory(out / "merged", keep=True) as tmp:
        save_merged_model(model, tmp, overwrite=True)  # with params="full" there is nothing to merge
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return outputs


def write_documents(out: Path, log: dict) -> None:
    """report.md, metrics.png and the final log.json (rank 0)."""
    write_report(out / "report.md", log)
    write_plot(out / "metrics.png", log)
    write_json(out / "log.json", log)
