"""Weight quantization on torch tensors (any device): llama.cpp's block formats and bitsandbytes' NF4, to ask
whether an edit of the weights survives the format a model is deployed in.

    roundtrip(weight, "q4_1")              # dequantize(quantize(w)): w's dtype and device
    quantize_blocks(weight, "q4_k")        # uint8, ggml's exact bytes (what a GGUF file stores)
    dequantize_blocks(raw, "q4_k", shape)  # float32 (or dtype=) values of those bytes
    with roundtrip_model(model, "q4_1"):   # every weight matrix round-tripped in place ...
        evaluate(model)                    # ... and restored bit for bit on leaving the block

Formats (``FORMATS``): q8_0, q4_0, q4_1, q5_0, q5_1 (blocks of 32), q4_k, q6_k (super-blocks of 256), nf4
(blocks of 64); ``FLOAT_FORMATS`` f32, f16, bf16 serve GGUF files. Bytes and values equal gguf-py's
(``gguf.quants``) bit for bit for the formats gguf-py quantizes; Q4_K / Q6_K port llama.cpp's reference
quantizers (see ``fastunlearn.ops.quant_k``), NF4 is bitsandbytes' without double quantization (see
``fastunlearn.ops.quant_legacy``). All quantization math is float32, as in llama.cpp; bf16 / fp16 weights are
upcast exactly, and round-tripped values are rounded to the weight's dtype at the end.

Memory: a weight is processed ``chunk_elements`` weights at a time (default ``CHUNK_ELEMENTS``: 2**16 on the CPU,
where the chunk's temporaries then stay in cache, 2**22 on a GPU, where fewer, larger kernels run faster), so beyond
the output the work holds one chunk's float32 copy and temporaries: at most ``extra_bytes_bound(fmt, chunk)``, i.e.
``EXTRA_BYTES_PER_ELEMENT`` (32 bytes; 128 for the K-quants, whose search keeps a dozen chunk-sized tensors) per
chunk element plus 4 MB, whatever the model's size: 6 MB / 12 MB at the CPU default, 132 MB / 516 MB on a GPU
(benchmarks/ops/bench_quant.py measures it). A weight must have a last dimension that is a multiple of the block size
(the format's rows are its rows); a non-contiguous weight is copied once. Non-finite weights are refused
(ValueError) before anything is computed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastunlearn.ops import quant_k as kq
from fastunlearn.ops import quant_legacy as lq

CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 22}  # by device type (others: the CPU's)
EXTRA_BYTES_PER_ELEMENT = {"q4_k": 128, "q6_k": 128}  # extra memory per chunk element; others: 32
EXTRA_BYTES_SLACK = 4 << 20  # allocator and page granularity, on top


class Format(NamedTuple):
    """One storage format: ``block`` weights are stored in ``size`` bytes; ``ggml_type`` is its GGUF type id.
    encode / decode: float32 blocks (B, block) <-> bytes (B, size); values: decode(encode(x)) (None: composed)."""

    name: str
    block: int
    size: int
    ggml_type: int | None
    encode: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    values: Callable[[Tensor], Tensor] | None = None


# ggml type ids: enum ggml_type in ggml.h (F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12,
# Q6_K 14, BF16 30)
_SPECS = (
    Format("q8_0", 32, 34, 8, lq.encode_q8_0, lq.decode_q8_0, lq.values_q8_0),
    Format("q4_0", 32, 18, 2, lq.encode_q4_0, lq.decode_q4_0, lq.values_q4_0),
    Format("q4_1", 32, 20, 3, lq.encode_q4_1, lq.decode_q4_1, lq.values_q4_1),
    Format("q5_0", 32, 22, 6, lq.encode_q5_0, lq.decode_q5_0, lq.values_q5_0),
    Format("q5_1", 32, 24, 7, lq.encode_q5_1, lq.decode_q5_1, lq.values_q5_1),
    Format("q4_k", 256, 144, 12, kq.encode_q4_k, kq.decode_q4_k),
    Format("q6_k", 256, 210, 14, kq.encode_q6_k, kq.decode_q6_k),
    Format("nf4", 64, 36, None, lq.encode_nf4, lq.decode_nf4, lq.values_nf4),
    Format("f32", 1, 4, 0, *lq.float_codec(torch.float32)),
    Format("f16", 1, 2, 1, *lq.float_codec(torch.float16)),
    Format("bf16", 1, 2, 30, *lq.float_codec(torch.bfloat16)),
)
SPECS = {spec.name: spec for spec in _SPECS}
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k", "nf4")
FLOAT_FORMATS = ("f32", "f16", "bf16")
BY_GGML_TYPE = {spec.ggml_type: spec.name for spec in _SPECS if spec.ggml_type is not None}
# llama-quantize's substitutes for a K-quant whose rows are not a multiple of 256 (then F16 if still not a fit)
K_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def spec_of(fmt: str) -> Format:
    """The Format named ``fmt`` (one of FORMATS or FLOAT_FORMATS), else ValueError naming it."""
    if fmt not in SPECS:
        raise ValueError(f"fmt must be one of {FORMATS + FLOAT_FORMATS}, got {fmt!r}")
    return SPECS[fmt]


def fits(shape: tuple[int, ...] | torch.Size, fmt: str) -> bool:
    """Whether a tensor of ``shape`` can be stored in ``fmt``: its last dimension is a multiple of the block."""
    return len(shape) >= 1 and shape[-1] % spec_of(fmt).block == 0


def llama_cpp_format(shape: tuple[int, ...] | torch.Size, fmt: str) -> str:
    """The format llama-quantize actually uses when asked for ``fmt`` on a tensor of ``shape``: a K-quant whose
    rows are not a multiple of 256 falls back to q5_0 (q4_k) or q8_0 (q6_k), then to f16 if that does not fit
    either. Other formats are returned as they are (they must fit)."""
    if fits(shape, fmt) or fmt not in K_FALLBACK:
        return fmt
    return K_FALLBACK[fmt] if fits(shape, K_FALLBACK[fmt]) else "f16"


def _check_weight(weight: object, spec: Format, name: str) -> None:
    if sys.byteorder != "little":
        raise RuntimeError("quantization writes little-endian bytes (GGUF's order); this machine is big-endian")
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {weight.dtype}")
    if weight.dim() < 1 or weight.shape[-1] % spec.block:
        raise ValueError(
            f"{name} has shape {tuple(weight.shape)}: {spec.name} stores rows in blocks of {spec.block}, so its "
            "last dimension must be a multiple of that"
        )


def default_chunk(device: torch.device | str) -> int:
    """CHUNK_ELEMENTS for the device's type."""
    return CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS["cpu"])


def extra_bytes_bound(fmt: str, chunk_elements: int) -> int:
    """The most memory a round trip in ``fmt`` holds beyond its input and output, chunk of ``chunk_elements``."""
    return EXTRA_BYTES_PER_ELEMENT.get(spec_of(fmt).name, 32) * chunk_elements + EXTRA_BYTES_SLACK


def _check_finite(x: Tensor, name: str, chunk_elements: int) -> None:
    """ValueError naming ``name`` if x holds NaN or +-inf (checked a chunk at a time)."""
    flat = x.detach().reshape(-1)
    for start in range(0, flat.numel(), chunk_elements):
        if not bool(torch.isfinite(torch.stack(torch.aminmax(flat[start : start + chunk_elements]))).all()):
            raise ValueError(f"{name} has non-finite values (NaN or +-inf): they have no quantized form")


def _chunk(chunk_elements: object, device: torch.device) -> int:
    """chunk_elements checked, or the device's default for None."""
    if chunk_elements is None:
        return default_chunk(device)
    if not isinstance(chunk_elements, int) or isinstance(chunk_elements, bool) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int or None, got {chunk_elements!r}")
    return chunk_elements


def _chunks(n_blocks: int, spec: Format, chunk_elements: int) -> Iterator[slice]:
    step = max(1, chunk_elements // spec.block)
    for start in range(0, n_blocks, step):
        yield slice(start, min(start + step, n_blocks))


def quantize_blocks(weight: Tensor, fmt: str, *, chunk_elements: int | None = None) -> Tensor:
    """``weight`` (..., k) in ``fmt``'s bytes: uint8 (..., k / block * bytes per block) on weight's device, each
    row its blocks in order (the data of a GGUF tensor of that type, HF shape (out, in) = ggml's ne reversed)."""
    spec = spec_of(fmt)
    _check_weight(weight, spec, "weight")
    chunk_elements = _chunk(chunk_elements, weight.device)
    blocks = weight.reshape(-1, spec.block)
    out = torch.empty(blocks.shape[0], spec.size, dtype=torch.uint8, device=weight.device)
    for part in _chunks(blocks.shape[0], spec, chunk_elements):
        x = blocks[part].float()
        _check_finite(x, "weight", chunk_elements)
        out[part] = spec.encode(x)
    return out.reshape(*weight.shape[:-1], weight.shape[-1] // spec.block * spec.size)


def dequantize_blocks(
    raw: Tensor, fmt: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
    *, chunk_elements: int | None = None,
) -> Tensor:  # fmt: skip
    """The values of ``fmt``'s bytes ``raw`` (uint8, any shape holding the whole tensor) as a ``shape`` tensor of
    ``dtype`` (computed in float32, then rounded to dtype)."""
    spec = spec_of(fmt)
    shape = tuple(shape)
    if not isinstance(raw, Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"raw must be a torch.uint8 tensor, got {getattr(raw, 'dtype', type(raw).__name__)}")
    chunk_elements = _chunk(chunk_elements, raw.device)
    if not shape or shape[-1] % spec.block:
        raise ValueError(f"shape {shape}: its last dimension must be a multiple of {spec.name}'s block {spec.block}")
    n_blocks = torch.Size(shape).numel() // spec.block
    if raw.numel() != n_blocks * spec.size:
        raise ValueError(f"raw has {raw.numel()} bytes, {spec.name} of shape {shape} takes {n_blocks * spec.size}")
    blocks = raw.reshape(n_blocks, spec.size)
    out = torch.empty(n_blocks, spec.block, dtype=dtype, device=raw.device)
    for part in _chunks(n_blocks, spec, chunk_elements):
        out[part] = spec.decode(blocks[part])
    return out.reshape(shape)


def _roundtrip_into(source: Tensor, target: Tensor, spec: Format, chunk_elements: int) -> None:
    """target[i] = dequantize(quantize(source[i])) chunk by chunk; target may be source itself."""
    blocks, out = source.reshape(-1, spec.block), target.view(-1, spec.block)
    values = spec.values or (lambda x: spec.decode(spec.encode(x)))
    for part in _chunks(blocks.shape[0], spec, chunk_elements):
        out[part] = values(blocks[part].float())


def roundtrip(weight: Tensor, fmt: str, *, chunk_elements: int | None = None) -> Tensor:
    """dequantize(quantize(weight)) in ``fmt``: a new tensor of weight's shape, dtype and device."""
    spec = spec_of(fmt)
    _check_weight(weight, spec, "weight")
    chunk_elements = _chunk(chunk_elements, weight.device)
    _check_finite(weight, "weight", chunk_elements)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    _roundtrip_into(weight, out, spec, chunk_elements)
    return out


# ---------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------
def is_weight_matrix(name: str, param: Tensor) -> bool:
    """The default selection of roundtrip_model: floating parameters of 2 or more dimensions (linear layers,
    embeddings, stacked experts), as llama.cpp's quantizer picks them; norms and biases (1-D) stay float."""
    return param.dim() >= 2 and param.dtype.is_floating_point


@dataclass
class RoundTrip:
    """What roundtrip_model did: ``formats`` (parameter name -> the format applied, after llama.cpp's K-quant
    fallback). ``restore()`` (or leaving the ``with`` block) puts the original weights back bit for bit."""

    formats: dict[str, str]
    _params: dict[str, Tensor] = field(repr=False)
    _backup: dict[str, Tensor] | None = field(repr=False)

    def restore(self) -> None:
        if self._backup is None:
            raise RuntimeError("roundtrip_model ran with backup=False: the original weights were not kept")
        with torch.no_grad():
            for name, saved in self._backup.items():
                self._params[name].copy_(saved)
        self._backup = {}

    def __enter__(self) -> RoundTrip:
        return self

    def __exit__(self, *exc) -> None:
        if self._backup is not None:
            self.restore()


def roundtrip_model(
    model: torch.nn.Module, fmt: str | Mapping[str, str], *,
    include: Callable[[str, Tensor], bool] | None = None, backup: bool = True, fallback: bool = True,
    progress: bool = True, chunk_elements: int | None = None,
) -> RoundTrip:  # fmt: skip
    """Round-trip ``model``'s weight matrices through ``fmt``, IN PLACE, and return a RoundTrip handle.

    ``fmt``: one format for every selected parameter, or a mapping parameter name -> format (e.g. the formats a GGUF
    file stores each tensor in: ``fastunlearn.gguf_io.formats_like``, 1-D norms included). ``include(name, param)``:
    which parameters; by default ``is_weight_matrix`` for one format, every parameter a mapping names. Tied
    parameters are round-tripped once. ``fallback``: a K-quant on a tensor whose rows are not a multiple of 256
    takes llama-quantize's substitute (``llama_cpp_format``); without it such a tensor is a ValueError. Every check
    (names, shapes, finite values) runs before any weight changes.

    ``backup=True`` keeps a copy of the selected originals on the CPU (their size in host memory) so that
    ``restore()``, or the end of ``with roundtrip_model(...):``, undoes the round trip exactly, also when an
    error stops it halfway; ``backup=False`` keeps nothing (the caller owns a copy of the model).
    ``progress`` shows a bar over the weights with an ETA.
    """
    _chunk(chunk_elements, "cpu")
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each name, done once
    if isinstance(fmt, Mapping):
        chosen = include or (lambda name, param: True)
        unknown = sorted(set(fmt) - set(params))
        if unknown:
            raise ValueError(f"fmt names parameters the model does not have: {', '.join(unknown[:3])}")
        wanted = {name: f for name, f in fmt.items() if chosen(name, params[name])}
    else:
        chosen = include or is_weight_matrix
        wanted = {name: fmt for name, p in params.items() if chosen(name, p)}
    formats, seen = {}, set()
    for name, f in wanted.items():
        param = params[name]
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        applied = llama_cpp_format(param.shape, f) if fallback else f
        _check_weight(param, spec_of(applied), f"parameter {name!r}")
        _check_finite(param, f"parameter {name!r}", _chunk(chunk_elements, param.device))
        formats[name] = applied
    handle = RoundTrip(formats, {n: params[n] for n in formats}, {} if backup else None)
    total = sum(params[n].numel() for n in formats)
    with torch.no_grad(), tqdm(total=total, desc=f"round trip {_describe(fmt)}", unit="w", unit_scale=True,
                               disable=not progress) as bar:  # fmt: skip
        try:
            for name, applied in formats.items():
                param = params[name]
                if backup:
                    handle._backup[name] = param.detach().to("cpu", copy=True)
                if param.is_contiguous():
                    _roundtrip_into(param.data, param.data, SPECS[applied], _chunk(chunk_elements, param.device))
                else:
                    param.data.copy_(roundtrip(param.data, applied, chunk_elements=chunk_elements))
                bar.update(param.numel())
        except BaseException:
            if backup:
                handle.restore()
            raise
    return handle


def _describe(fmt: str | Mapping[str, str]) -> str:
    return fmt if isinstance(fmt, str) else "+".join(sorted(set(fmt.values())))
