"""Writing a model's weights as a GGUF file shaped like the one it came from: every metadata key-value pair of the
template (tokenizer and chat template included) copied byte for byte, every tensor under the template's name,
shape and quantization type, re-quantized from the model's weights (``fastunlearn.ops.quant``).

    write_gguf_like(model, "SmolLM2-135M-Instruct.Q4_1.gguf", "forgotten.Q4_1.gguf")
    formats_like(model, template)  # {"model.layers.0.self_attn.q_proj.weight": "q4_1", ...}

``formats_like`` gives each parameter the format the template stores it in, for
``fastunlearn.ops.quant.roundtrip_model``: the same values a reader of the written file gets.

Architectures: Llama-family files (``general.architecture`` "llama": Llama, Mistral, SmolLM, ...). Tensor names
map as transformers' GGUF loader maps them (gguf-py's ``TensorNameMap``); q_proj / k_proj rows are permuted back
into llama.cpp's order (its converter's ``permute``, which transformers undoes on loading: per head, the two
rotary halves interleaved). Quantization is per row, so the row permutation and the round trip commute. Types
written: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K (every type of a Q4_0/Q4_1/Q8_0/Q4_K_M/Q6_K
file); a template holding another type is refused before anything is written.

Safety: the file appears whole or not at all (written under a temporary name next to it, then renamed; see
``fastunlearn.utils.atomic``), and an existing ``out_path`` is replaced only when it is this tool's own output,
recognized by the metadata key ``fastunlearn.version`` that every written file carries (``is_own_gguf``). A
model weight without a tensor in the template, a template tensor without a weight (``rope_freqs.weight``, which is
not a model parameter, is copied as it is), a shape that differs, or untied output weights where the template ties
them (no ``output.weight``) are ValueErrors naming the tensor.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastunlearn.models import GGUF_INSTALL, GGUF_MAGIC
from fastunlearn.ops import quant
from fastunlearn.utils.atomic import fsync_path, scratch_for

MARKER_KEY = "fastunlearn.version"  # a string KV pair in every file this module writes
ARCHITECTURES = ("llama",)
COPIED_AS_IS = ("rope_freqs.weight",)  # template tensors that are no model parameter
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
STRING = 8  # GGUFValueType.STRING


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output: its GGUF name, ggml dims (ne, fastest first), format, and where its values come
    from (a model weight, row-permuted for llama.cpp or not, or the template's own bytes)."""

    name: str
    ne: tuple[int, ...]
    fmt: str
    source: str | None  # the state-dict key; None: the template's bytes
    permute_heads: int | None  # q/k rows: heads of llama.cpp's permute


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading and writing GGUF files needs the 'gguf' package: {GGUF_INSTALL}") from None
    return gguf


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastunlearn")
    except PackageNotFoundError:
        return "unknown"


def _reader(path: Path, what: str):
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a file")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ValueError(f"{what} {str(path)!r} is not a GGUF file (it does not start with b'GGUF')")
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"could not read {what} {str(path)!r}: {' '.join(str(exc).split())[:300]}") from exc


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def is_own_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file written by this module (it holds the ``fastunlearn.version`` key)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return False
        return MARKER_KEY in _gguf().GGUFReader(str(path)).fields
    except (OSError, ValueError, IndexError, KeyError):
        return False


def _weights(model_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return {n: p.detach() for n, p in model_or_state_dict.named_parameters(remove_duplicate=False)}
    if isinstance(model_or_state_dict, Mapping):
        return {n: t.detach() for n, t in model_or_state_dict.items() if isinstance(t, torch.Tensor)}
    raise TypeError(f"model_or_state_dict must be a torch.nn.Module or a state dict, got {type(model_or_state_dict)}")


def _plan(weights: dict[str, torch.Tensor], reader, template: Path) -> list[TensorPlan]:
    """Every output tensor, checked against the model's weights before anything is written."""
    gguf = _gguf()
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"template {str(template)!r} is a {arch!r} model; writable architectures: {ARCHITECTURES}")
    n_layers = int(_field(reader, f"{arch}.block_count"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, n_layers)
    to_gguf = {key: names.get_name(key, try_suffixes=(".weight", ".bias")) for key in weights}
    in_template = {t.name for t in reader.tensors}
    unmapped = [k for k, g in to_gguf.items() if g not in in_template]
    if "output.weight" not in in_template and to_gguf.get("lm_head.weight") == "output.weight":
        unmapped.remove("lm_head.weight")  # tied in the file: the output layer must be the embedding
        embed = next((k for k, g in to_gguf.items() if g == "token_embd.weight"), None)
        head = weights["lm_head.weight"]
        if embed is None or not (head.data_ptr() == weights[embed].data_ptr() or torch.equal(head, weights[embed])):
            raise ValueError(
                f"template {str(template)!r} ties the output layer to the token embedding (it has no "
                "output.weight), but the model's lm_head.weight differs from its embedding"
            )
    if unmapped:
        raise ValueError(
            f"template {str(template)!r} has no tensor for the model's {', '.join(unmapped[:3])}"
            f"{' and more' if len(unmapped) > 3 else ''} (merge adapters into the weights before writing)"
        )
    from_gguf = {g: k for k, g in to_gguf.items() if g in in_template}
    plans = []
    for tensor in reader.tensors:
        ne = tuple(int(n) for n in tensor.shape)
        type_name = tensor.tensor_type.name
        fmt = quant.BY_GGML_TYPE.get(int(tensor.tensor_type))
        if fmt is None:
            writable = ", ".join(sorted(n.upper() for n in quant.BY_GGML_TYPE.values()))
            raise ValueError(f"template tensor {tensor.name!r} is stored as {type_name}, which cannot be written "
                             f"(writable types: {writable})")  # fmt: skip
        key = from_gguf.get(tensor.name)
        if key is None:
            if tensor.name not in COPIED_AS_IS:
                raise ValueError(f"the model has no weight for template tensor {tensor.name!r}")
            plans.append(TensorPlan(tensor.name, ne, fmt, None, None))
            continue
        if tuple(weights[key].shape) != ne[::-1]:
            raise ValueError(f"the model's {key} has shape {tuple(weights[key].shape)}, template tensor "
                             f"{tensor.name!r} has {ne[::-1]}")  # fmt: skip
        if not quant.fits(ne[::-1], fmt):
            raise ValueError(f"template tensor {tensor.name!r} of shape {ne[::-1]} cannot be stored as {type_name}")
        permute = heads if ".attn_q." in tensor.name else kv_heads if ".attn_k." in tensor.name else None
        plans.append(TensorPlan(tensor.name, ne, fmt, key, permute))
    return plans


def formats_like(model_or_state_dict, template: str | os.PathLike) -> dict[str, str]:
    """Parameter name -> the format (``fastunlearn.ops.quant``) the template GGUF stores that weight in (for a
    tied output layer, the embedding's). Checks the model against the template as write_gguf_like does."""
    weights = _weights(model_or_state_dict)
    template = Path(template)
    plans = _plan(weights, _reader(template, "template"), template)
    formats = {p.source: p.fmt for p in plans if p.source is not None}
    if "lm_head.weight" in weights and "lm_head.weight" not in formats:  # tied: _plan checked it equals the embedding
        formats["lm_head.weight"] = next(p.fmt for p in plans if p.name == "token_embd.weight")
    return formats


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter ``permute`` of q/k rows (out, in): per head, rows [first half, second half] of the
    rotary pairs become interleaved, as llama.cpp's RoPE reads them."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _pad(size: int, alignment: int) -> int:
    return -size % alignment


def _data_bytes(plan: TensorPlan) -> int:
    spec = quant.SPECS[plan.fmt]
    rows = 1
    for n in plan.ne[1:]:
        rows *= n
    return rows * (plan.ne[0] // spec.block) * spec.size


def write_gguf_like(
    model_or_state_dict, template: str | os.PathLike, out_path: str | os.PathLike, *,
    progress: bool = True, durable: bool = False,
) -> Path:  # fmt: skip
    """Write ``model_or_state_dict``'s weights to ``out_path`` as a GGUF file with ``template``'s metadata and each
    tensor in the template's type; returns the path. Refuses (FileExistsError) an existing ``out_path`` that this
    module did not write; a mismatch between model and template is a ValueError, raised before writing.
    ``durable``: fsync the file and its folder. ``progress``: a bar over the tensors' weights with an ETA."""
    weights = _weights(model_or_state_dict)
    template, out = Path(template), Path(os.path.abspath(out_path))
    reader = _reader(template, "template")
    if reader.endianess.name != "LITTLE":
        raise ValueError(f"template {str(template)!r} is a big-endian GGUF file; only little-endian is written")
    if out.exists() and not (out.is_file() and is_own_gguf(out)):
        raise FileExistsError(
            f"out_path {str(out)!r} exists and was not written by fastunlearn (it holds no {MARKER_KEY} key): "
            "choose another path or move it away"
        )
    plans = _plan(weights, reader, template)
    alignment = int(_field(reader, "general.alignment", DEFAULT_ALIGNMENT))
    kv = [b"".join(part.tobytes() for part in field.parts) for name, field in reader.fields.items()
          if not name.startswith("GGUF.") and name != MARKER_KEY]  # fmt: skip
    kv.append(_string(MARKER_KEY) + struct.pack("<I", STRING) + _string(_version()))
    infos, offset = [], 0
    for plan in plans:
        ggml_type = quant.SPECS[plan.fmt].ggml_type
        dims = struct.pack(f"<I{len(plan.ne)}Q", len(plan.ne), *plan.ne)
        infos.append(_string(plan.name) + dims + struct.pack("<IQ", ggml_type, offset))
        offset += _data_bytes(plan) + _pad(_data_bytes(plan), alignment)
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(plans), len(kv)) + b"".join(kv) + b"".join(infos)
    template_data = {t.name: t.data for t in reader.tensors}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_for(out) / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    total = sum(int(torch.Size(p.ne).numel()) for p in plans)
    try:
        with open(tmp, "wb") as handle, tqdm(total=total, desc=f"writing {out.name}", unit="w", unit_scale=True,
                                             disable=not progress) as bar:  # fmt: skip
            handle.write(head + bytes(_pad(len(head), alignment)))
            for plan in plans:
                if plan.source is None:
                    data = template_data[plan.name].tobytes()
                else:
                    weight = weights[plan.source]
                    if plan.permute_heads is not None:
                        weight = llama_cpp_permute(weight, plan.permute_heads)
                    data = quant.quantize_blocks(weight, plan.fmt).cpu().numpy().tobytes()
                if len(data) != _data_bytes(plan):
                    raise RuntimeError(f"{plan.name}: {len(data)} bytes written, {_data_bytes(plan)} expected")
                handle.write(data + bytes(_pad(len(data), alignment)))
                bar.update(int(torch.Size(plan.ne).numel()))
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, out)
        if durable:
            fsync_path(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return out
