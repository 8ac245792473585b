"""The quantization probe: does the forgetting survive the format the model is deployed in?

Each weight selection is round-tripped in place (``fastunlearn.ops.quant.roundtrip_model``: quantize, dequantize,
restored bit for bit afterwards, also on an error) and the forget and held-out sets measured on the result:

- llama.cpp's block formats (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``; ``q4_k``, ``q6_k`` with llama-quantize's
  substitute for rows that are not a multiple of 256): every floating weight of two or more dimensions, embeddings
  included, as llama-quantize picks them; norms and biases stay float.
- ``nf4``: bitsandbytes' 4-bit NormalFloat, as ``load_in_4bit`` applies it: the weights of the ``nn.Linear`` layers
  except the output layer (bitsandbytes keeps it, and the embeddings, in float).
- ``gguf``: each weight in the type a GGUF file stores it in (``fastunlearn.gguf_io.formats_like``): what a reader of
  that file, or of the model written like it, computes with.

**Criterion** (the engine's, applied to the quantized model): in format Q the forget set's MA and EL_n on Q(model) must
be at or below the held-out set's on Q(reference) when a reference (the model before unlearning) is given, else on
Q(model). A format where either is above is a FAILED probe. The float row applies the same rule without a round
trip (the engine's own criterion, held-out values of the reference measured now): the forget set must be at the
held-out level to begin with.

Cost per format: one round trip of the selected weights (CPU seconds for SmolLM2-135M's weights on one core: 1.3 to
2 for the 32-weight formats, 4 for nf4, 7 to 11 for the K-quants; twice with a reference), then MA and EL_n of both sets
(of the held-out set on the reference too). A backup of the selected weights is kept on the CPU while a format is
measured (their size in host memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from fastunlearn.data.text import SequenceSet
from fastunlearn.evals.audit.config import AuditConfig
from fastunlearn.evals.audit.measure import Steps, ma_el, means, meets
from fastunlearn.ops.quant import fits, is_weight_matrix, llama_cpp_format, roundtrip_model

Values = dict[str, Tensor]  # {"ma", "el"}: per-sequence values


def linear_weights(model: nn.Module) -> Callable[[str, Tensor], bool]:
    """The selection of ``nf4``: weights of ``nn.Linear`` layers other than the output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not output}  # fmt: skip
    return lambda name, param: name in names


def roundtrip_args(model: nn.Module, fmt: str | Mapping[str, str]) -> dict:
    """roundtrip_model's ``fmt`` and ``include`` for one probe format (see the module docstring)."""
    if fmt == "nf4":
        return {"fmt": fmt, "include": linear_weights(model)}
    return {"fmt": fmt, "include": None}


def check_formats(model: nn.Module, formats: tuple[str, ...], name: str = "model") -> None:
    """Before any compute: every weight a format selects can be stored in it (after llama.cpp's K-quant fallback),
    else ValueError naming the parameter, its shape and the format."""
    params = dict(model.named_parameters())
    for fmt in formats:
        include = roundtrip_args(model, fmt)["include"] or is_weight_matrix
        for pname, param in params.items():
            if include(pname, param) and not fits(param.shape, llama_cpp_format(param.shape, fmt)):
                raise ValueError(f"format {fmt!r} cannot store {name} parameter {pname!r} of shape "
                                 f"{tuple(param.shape)}: its rows are not a multiple of its block")  # fmt: skip


def _measure_quantized(model: nn.Module, fmt, sets: dict[str, SequenceSet], cfg: AuditConfig) -> dict[str, Values]:
    with roundtrip_model(model, **roundtrip_args(model, fmt), progress=False):
        return {name: ma_el(model, seqs, cfg.el_n, cfg.batch_size) for name, seqs in sets.items()}


def label(fmt: str | Mapping[str, str], gguf_name: str | None = None) -> str:
    if isinstance(fmt, str):
        return fmt
    return f"gguf ({gguf_name}: {', '.join(sorted(set(fmt.values())))})"


def probe_quantization(
    model: nn.Module, forget: SequenceSet, heldout: SequenceSet, cfg: AuditConfig, float_values: dict[str, Values],
    steps: Steps, *, reference: nn.Module | None = None, gguf: tuple[str, Mapping, Mapping | None] | None = None,
) -> dict:  # fmt: skip
    """The probe's report (see the module docstring). ``float_values``: per-sequence {"forget", "heldout"} of the
    model and, with a reference, "heldout_reference". ``gguf``: (file name, the model's formats_like mapping,
    the reference's or None)."""
    rows = []
    limit_of = "the held-out set on Q(reference)" if reference is not None else "the held-out set on Q(model)"
    float_limit = means(float_values["heldout_reference" if reference is not None else "heldout"])
    rows.append(_row("float", means(float_values["forget"]), means(float_values["heldout"]),
                     float_limit if reference is not None else None, float_limit, 0.0))  # fmt: skip
    formats: list[tuple[str, object, object]] = [(f, f, f) for f in cfg.formats]
    if gguf is not None:
        name, mapping, ref_mapping = gguf
        formats.append((label(mapping, name), mapping, ref_mapping if ref_mapping is not None else mapping))
    for shown, fmt, ref_fmt in formats:
        steps.start(f"quantization {shown}")
        start = time.perf_counter()
        values = _measure_quantized(model, fmt, {"forget": forget, "heldout": heldout}, cfg)
        held_ref = None
        if reference is not None:
            held_ref = means(_measure_quantized(reference, ref_fmt, {"heldout": heldout}, cfg)["heldout"])
        held = means(values["heldout"])
        limit = held_ref if held_ref is not None else held
        rows.append(_row(shown, means(values["forget"]), held, held_ref, limit, time.perf_counter() - start))
        steps.done()
    failed = [row["format"] for row in rows if not row["passed"]]
    n = cfg.el_n
    if not failed:
        verdict = f"PASSED: in every format ({', '.join(r['format'] for r in rows)}) the forget set's MA and " \
                  f"EL_{n} stay at or below {limit_of}"  # fmt: skip
    else:
        worst = [f"{r['format']} (forget MA {r['forget']['ma']:.3f} / EL_{n} {r['forget']['el']:.3f} vs "
                 f"{r['limit']['ma']:.3f} / {r['limit']['el']:.3f})" for r in rows if not r["passed"]]  # fmt: skip
        verdict = f"FAILED: the forget set is above {limit_of} in {', '.join(worst)}"
    return {
        "criterion": f"for each format Q, forget MA and EL_{n} on Q(model) at or below {limit_of} (float: no round "
        "trip, the engine's criterion)",
        "rows": rows,
        "failed": failed,
        "passed": not failed,
        "verdict": verdict,
    }


def _row(fmt: str, forget: dict, heldout: dict, heldout_reference: dict | None, limit: dict, seconds: float) -> dict:
    return {"format": fmt, "forget": forget, "heldout": heldout, "heldout_reference": heldout_reference,
            "limit": limit, "passed": meets(forget, limit), "seconds": seconds}  # fmt: skip
