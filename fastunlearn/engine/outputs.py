"""What a finished run leaves: ``adapter/`` (PEFT), ``merged/`` (transformers), ``merged.gguf`` (a model loaded
from a GGUF file: the same file's metadata and tensor types), the report, plot and log."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fastunlearn import gguf_io
from fastunlearn.engine import parallel
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.outdir import OutDirError
from fastunlearn.engine.report import write_json, write_plot, write_report
from fastunlearn.lora.export import merged_state_dict, save_merged_model, save_peft_adapter
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.atomic import atomic_directory

OUTPUTS = {"merged": "merged", "report": "report.md", "plot": "metrics.png"}
GGUF = "merged.gguf"


def export_models(model: nn.Module, cfg: UnlearnConfig, out: Path, tokenizer) -> dict[str, str]:
    """adapter/ (PEFT, for the unmodified base model), merged/ (a plain transformers model + tokenizer) and,
    with ``gguf_template`` and ``write_gguf``, merged.gguf (``gguf_io.write_gguf_like``: the template's metadata
    and tokenizer, every tensor re-quantized in its type from the merged weights; replaced only when it is this
    tool's own file), written by rank 0 (from a CPU copy of the full weights under FSDP; every rank must call)."""
    if parallel.is_sharded(model):
        model = parallel.cpu_replica(model)
    outputs = dict(OUTPUTS)
    if cfg.params != "full":
        outputs["adapter"] = "adapter"
    if cfg.gguf_template is not None and cfg.write_gguf:
        outputs["gguf"] = GGUF
    if not dist_utils.current().is_main:
        return outputs
    if cfg.params != "full":  # keep=True: a file of yours in adapter/ or merged/ stays (engine.outdir)
        with atomic_directory(out / "adapter", keep=True) as tmp:
            save_peft_adapter(model, tmp, overwrite=True)
    with atomic_directory(out / "merged", keep=True) as tmp:
        save_merged_model(model, tmp, overwrite=True)  # with params="full" there is nothing to merge
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if "gguf" in outputs:
        gguf_io.write_gguf_like(merged_state_dict(model), cfg.gguf_template, out / GGUF, durable=True)
    return outputs


def check_outputs(out: Path, cfg: UnlearnConfig, process) -> None:
    """Before any compute: a merged.gguf already in OUT (a resumed run's export) must be this tool's own file,
    which the export replaces; anything else there is refused (OutDirError naming it, on every rank), never
    overwritten. Rank 0 looks."""
    error = None
    if process.is_main:
        try:
            _check_gguf_target(out, cfg)
        except OutDirError as exc:
            error = exc
    dist_utils.raise_together(error)


def _check_gguf_target(out: Path, cfg: UnlearnConfig) -> None:
    target = out / GGUF
    if cfg.gguf_template is None or not cfg.write_gguf or not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_file() or not gguf_io.is_own_gguf(target):
        raise OutDirError(f"out_dir {str(out)!r} holds a {GGUF} that this tool did not write (it has no "
                          f"{gguf_io.MARKER_KEY} key): move it away, or pass write_gguf=False (--no-gguf)")  # fmt: skip


def write_documents(out: Path, log: dict) -> None:
    """report.md, metrics.png and the final log.json (rank 0)."""
    write_report(out / "report.md", log)
    write_plot(out / "metrics.png", log)
    write_json(out / "log.json", log)
