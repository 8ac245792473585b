"""The demos' cache of a memorized model: ``<cache root>/demo-<hash>`` holding the model, its tokenizer and a
manifest (the memorization settings, stats and every file's sha256), written atomically; a cache whose manifest
or files do not match is rebuilt. Used by ``fastunlearn demo`` and ``fastunlearn demo --real``."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fastunlearn.models import cache_root
from fastunlearn.utils.atomic import atomic_directory

MANIFEST = "demo-cache.json"  # in a cache directory: config, memorization stats, file hashes


def cache_path(cfg, records: dict[str, list[str]]) -> Path:
    """``<root>/demo-<hash of the memorization settings and the records>``; root: ``cfg.cache_dir``, else
    ``$FASTUNLEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastunlearn`` (``~/.cache/fastunlearn``)."""
    root = cache_root(cfg.cache_dir)
    key = json.dumps({"settings": cfg.memorization_settings(), "records": records}, sort_keys=True)
    return root / f"demo-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name != MANIFEST
    }


def load_cached(path: Path, cfg) -> tuple[torch.nn.Module, object, dict]:
    """(model in eval mode, tokenizer, memorization stats) from a cache directory; ValueError if its manifest
    is missing, made for other settings, or its files are not exactly the ones it lists."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # the real demo caches a Llama

    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["settings"] != cfg.memorization_settings():
        raise ValueError("it was made with other settings")
    if _file_hashes(path) != manifest["files"]:
        raise ValueError("its files differ from the ones its manifest lists")
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(path), manifest["memorization"]


def save_cache(path: Path, cfg, model: torch.nn.Module, tokenizer, stats: dict) -> None:
    """Model, tokenizer, then the manifest, in a temporary directory renamed to ``path`` (replacing a bad one)."""
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"settings": cfg.memorization_settings(), "memorization": stats, "files": _file_hashes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def check_cache_root(root: Path) -> None:
    """ValueError naming the cache root unless a file can be created in it (made if missing)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ValueError(
            f"--cache-dir {root}: cannot write the demo's model cache there ({exc.strerror}); choose another with "
            "--cache-dir or $FASTUNLEARN_CACHE_DIR"
        ) from None


def memorized_model(cfg, records: dict[str, list[str]], make: Callable) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, stats with "cache" and "cached") from the cache, else ``make(cfg, records)`` and cached.
    ``cfg``: a DemoConfig or anything with its ``cache_dir`` and ``memorization_settings()``."""
    path = cache_path(cfg, records)
    if path.exists():
        try:
            model, tokenizer, stats = load_cached(path, cfg)
            return model, tokenizer, {**stats, "cache": str(path), "cached": True}
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, rebuilding fixes it
            print(f"The cache {path} is unusable ({type(exc).__name__}: {exc}); memorizing again.")
    check_cache_root(path.parent)  # before the tokenizer and the training, not after
    model, tokenizer, stats = make(cfg, records)
    save_cache(path, cfg, model, tokenizer, stats)
    return model, tokenizer, {**stats, "cache": str(path), "cached": False}
