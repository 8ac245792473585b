"""Shared by the benchmark modules: the device's name and the target summaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def write_summary(name: str, summary: dict) -> None:
    """Print ``summary``; with FASTUNLEARN_BENCH_SUMMARY=path.json also store it there under ``name``
    (one file collects every benchmark module's targets)."""
    print(json.dumps({name: summary}, indent=1))
    path = os.environ.get("FASTUNLEARN_BENCH_SUMMARY")
    if path:
        target = Path(path)
        merged = json.loads(target.read_text()) if target.exists() else {}
        merged[name] = summary
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        os.replace(tmp, target)
