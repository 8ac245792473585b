"""fastunlearn.ops.quant against gguf-py (bytes and values bit for bit for every format gguf-py quantizes: odd
shapes, zero and constant rows, 1e30, denormals, rounding ties, fp32/bf16/fp16 inputs), NF4 against a float64
nearest-level reference; roundtrip_model in place and undone exactly. The K-quants: test_quant_k.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastunlearn.ops import quant
from fastunlearn.ops.quant_legacy import NF4_LEVELS, nearest_int, round_half_away
from tests.helpers.quant import (
    DTYPES,
    GGUF_TYPES,
    K_TYPES,
    T,
    gguf,
    gguf_dequantize,
    gguf_quantize,
    hard_rows,
    same_bits,
    tie_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# Rounding helpers
# ---------------------------------------------------------------------------------------------------------
def test_nearest_int_is_half_to_even_and_roundf_half_away():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 4194303.0, -4194303.0, 7.0])
    assert nearest_int(x).tolist() == [0, 2, 2, 0, -2, -2, 0, 4194303, -4194303, 7]
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -2, -3, 0, 4194303, -4194303, 7]
    assert nearest_int(x).tolist() == torch.round(x).to(torch.int32).tolist()  # the same as ATen's round here


# ---------------------------------------------------------------------------------------------------------
# The formats gguf-py quantizes: bytes and values bit for bit
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
@pytest.mark.parametrize("k", [32, 96, 160])
def test_bytes_and_values_equal_gguf(fmt, k):
    for name, x in hard_rows(k).items():
        raw = quant.quantize_blocks(x, fmt)
        expected = gguf_quantize(x, fmt)
        assert np.array_equal(raw.numpy(), expected), (fmt, name)
        values = quant.dequantize_blocks(raw, fmt, x.shape)
        assert same_bits(values, gguf_dequantize(expected, fmt)), (fmt, name)
        assert same_bits(quant.roundtrip(x, fmt), values), (fmt, name)


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_rounding_ties_follow_llama_cpp(fmt):
    x = tie_rows(fmt)
    raw = quant.quantize_blocks(x, fmt)
    assert np.array_equal(raw.numpy(), gguf_quantize(x, fmt))
    if fmt == "q8_0":  # 2.5 -> 3, -2.5 -> -3 (round half away from zero, C's roundf)
        q = raw[0, 2:34].view(torch.int8)
        assert q[1:16].tolist() == [int(np.copysign(np.floor(abs(h) + 0.5), h)) for h in x[0, 1:16].tolist()]


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_inputs_match_gguf_on_their_float32_values(fmt, dtype):
    x = (torch.randn(5, 96) * 0.05).to(dtype)
    expected = gguf_quantize(x.float(), fmt)
    assert np.array_equal(quant.quantize_blocks(x, fmt).numpy(), expected)
    out = quant.roundtrip(x, fmt)
    assert out.dtype == dtype and same_bits(out, gguf_dequantize(expected, fmt).to(dtype))


@pytest.mark.parametrize("fmt", [*GGUF_TYPES, *K_TYPES, "nf4", *quant.FLOAT_FORMATS])
def test_chunking_and_leading_dimensions_do_not_change_the_result(fmt):
    x = torch.randn(3, 5, 512)
    whole = quant.quantize_blocks(x, fmt)
    spec = quant.SPECS[fmt]
    assert whole.shape == (3, 5, 512 // spec.block * spec.size) and whole.dtype == torch.uint8
    assert torch.equal(quant.quantize_blocks(x, fmt, chunk_elements=spec.block * 3), whole)
    assert torch.equal(quant.quantize_blocks(x.reshape(15, 512), fmt).reshape(whole.shape), whole)
    values = quant.dequantize_blocks(whole, fmt, x.shape, chunk_elements=1)
    assert same_bits(values, quant.dequantize_blocks(whole.flatten(), fmt, x.shape))
    assert same_bits(quant.roundtrip(x, fmt, chunk_elements=700), values)
    assert same_bits(quant.roundtrip(x.mT.contiguous().mT, fmt), values)  # a non-contiguous weight


@pytest.mark.parametrize("fmt", quant.FLOAT_FORMATS)
def test_float_formats_are_rounding_casts_with_ggufs_bytes(fmt):
    x = torch.cat([torch.randn(4, 64) * 1e3, hard_rows(64)["mixed"]])
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[fmt]
    assert same_bits(quant.roundtrip(x, fmt), x.to(dtype).float())
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(x.numpy(), getattr(T, fmt.upper()))
    assert np.array_equal(quant.quantize_blocks(x, fmt).numpy(), expected.view(np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_naming_it():
    with pytest.raises(ValueError, match="fmt must be one of .* got 'q3_k'"):
        quant.roundtrip(torch.randn(2, 32), "q3_k")
    with pytest.raises(ValueError, match=r"shape \(2, 48\): q4_0 stores rows in blocks of 32"):
        quant.quantize_blocks(torch.randn(2, 48), "q4_0")
    with pytest.raises(ValueError, match=r"shape \(2, 64\).*blocks of 256"):
        quant.roundtrip(torch.randn(2, 64), "q4_k")
    with pytest.raises(TypeError, match="weight must be float32"):
        quant.roundtrip(torch.ones(2, 32, dtype=torch.int32), "q8_0")
    bad = torch.randn(2, 64)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quant.roundtrip(bad, "q8_0")
    with pytest.raises(ValueError, match="raw has 30 bytes, q8_0 of shape .* takes 68"):
        quant.dequantize_blocks(torch.zeros(30, dtype=torch.uint8), "q8_0", (2, 32))
    with pytest.raises(ValueError, match="chunk_elements must be a positive int"):
        quant.roundtrip(torch.randn(2, 32), "q8_0", chunk_elements=0)


# ---------------------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------------------
def test_nf4_is_the_nearest_level_times_the_block_absmax():
    x = torch.cat([torch.randn(40, 192), torch.distributions.StudentT(2.0).sample((8, 192))]).double()
    blocks = x.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    scaled = blocks / absmax
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    ref_idx = (scaled.unsqueeze(-1) - levels).abs().argmin(-1)
    ours = quant.roundtrip(x.float(), "nf4").double().reshape(-1, 64)
    our_idx = (ours.unsqueeze(-1) / absmax.unsqueeze(-1) - levels).abs().argmin(-1)
    on_levels = (levels.float()[our_idx] * absmax.float()).double()  # float32 level x float32 absmax
    torch.testing.assert_close(ours, on_levels, rtol=0, atol=0)
    midpoints = (levels[:-1] + levels[1:]) / 2
    near_tie = (scaled.unsqueeze(-1) - midpoints).abs().amin(-1) < 1e-6
    assert bool((our_idx == ref_idx)[~near_tie].all())
    assert bool(((our_idx - ref_idx).abs() <= 1)[near_tie].all())


def test_nf4_ties_take_the_lower_level_and_bytes_follow_bitsandbytes_layout():
    midpoints = torch.tensor(
        [(a + b) / 2 for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:], strict=True)], dtype=torch.float64
    ).float()
    row = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(48)])
    raw = quant.quantize_blocks(row.unsqueeze(0), "nf4")
    assert raw.shape == (1, 36) and raw[0, :4].view(torch.float32).item() == 1.0
    q = torch.stack([raw[0, 4:] >> 4, raw[0, 4:] & 15], dim=1).reshape(-1)
    assert q[0].item() == 15 and q[1:16].tolist() == list(range(15)) and set(q[16:].tolist()) == {7}
    assert not bool(quant.roundtrip(torch.zeros(3, 64), "nf4").any())


# ---------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 64)
        self.proj = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 96)
        self.norm = torch.nn.LayerNorm(96)
        self.head = torch.nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight  # tied


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def test_roundtrip_model_in_place_once_per_tied_weight_then_restored_bit_for_bit():
    model = Tiny()
    before = snapshot(model)
    with quant.roundtrip_model(model, "q4_1", progress=False) as handle:
        assert handle.formats == {"embed.weight": "q4_1", "proj.weight": "q4_1", "down.weight": "q4_1"}
        for name in ("embed.weight", "proj.weight", "down.weight"):
            assert torch.equal(dict(model.named_parameters())[name], quant.roundtrip(before[name], "q4_1"))
        assert model.head.weight is model.embed.weight
        for name in ("proj.bias", "norm.weight", "norm.bias"):
            assert torch.equal(dict(model.named_parameters())[name], before[name])
    after = snapshot(model)
    assert all(same_bits(after[n], before[n]) for n in before)


def test_roundtrip_model_takes_per_parameter_formats_and_llama_cpps_k_quant_fallback():
    model = Tiny()
    before = snapshot(model)
    formats = {"embed.weight": "q4_k", "proj.weight": "q6_k", "down.weight": "q4_k", "norm.weight": "q8_0"}
    handle = quant.roundtrip_model(model, formats, progress=False, backup=False)
    # embed (50, 64): 64 % 256 -> q5_0 (llama-quantize's substitute); down (96, 256) fits; a named 1-D norm too
    assert handle.formats == {
        "embed.weight": "q5_0",
        "proj.weight": "q8_0",
        "down.weight": "q4_k",
        "norm.weight": "q8_0",
    }
    assert torch.equal(model.norm.weight, quant.roundtrip(before["norm.weight"], "q8_0"))
    assert torch.equal(model.norm.bias, before["norm.bias"])
    assert torch.equal(model.proj.weight, quant.roundtrip(before["proj.weight"], "q8_0"))
    assert torch.equal(model.down.weight, quant.roundtrip(before["down.weight"], "q4_k"))
    with pytest.raises(RuntimeError, match="backup=False"):
        handle.restore()
    assert quant.llama_cpp_format((8, 48), "q6_k") == "f16" and quant.llama_cpp_format((8, 512), "q6_k") == "q6_k"
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' has shape \(50, 64\).*blocks of 256"):
        quant.roundtrip_model(Tiny(), "q4_k", fallback=False, progress=False)
    with pytest.raises(ValueError, match="does not have: nope"):
        quant.roundtrip_model(Tiny(), {"nope": "q8_0"}, progress=False)


def test_roundtrip_model_checks_everything_before_changing_anything_and_undoes_a_failure(monkeypatch):
    model = Tiny()
    with torch.no_grad():
        model.down.weight[3, 5] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="parameter 'down.weight' has non-finite values"):
        quant.roundtrip_model(model, "q8_0", progress=False)
    assert all(same_bits(p, before[n]) for n, p in snapshot(model).items())

    model = Tiny()
    before = snapshot(model)
    calls = []

    def failing(x):
        calls.append(x.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return quant.lq.values_q8_0(x)

    monkeypatch.setitem(quant.SPECS, "q8_0", quant.SPECS["q8_0"]._replace(values=failing))
    with pytest.raises(KeyboardInterrupt):
        quant.roundtrip_model(model, "q8_0", progress=False)
    assert all(same_bits(p, before[n]) for n, p in snapshot(model).items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", [*quant.FORMATS, *quant.FLOAT_FORMATS])
def test_cuda_writes_the_cpus_bytes_and_values(fmt):
    """Every operation is IEEE float32 on both devices (no reciprocal-multiply division, see quant_legacy.div)."""
    rows = [t for t in hard_rows(512).values()] + [torch.randn(64, 512) * 0.02]
    x = torch.cat(rows)
    cpu = quant.quantize_blocks(x, fmt)
    assert torch.equal(quant.quantize_blocks(x.cuda(), fmt).cpu(), cpu)
    assert same_bits(quant.roundtrip(x.cuda(), fmt).cpu(), quant.roundtrip(x, fmt))
    assert same_bits(
        quant.dequantize_blocks(cpu.cuda(), fmt, x.shape).cpu(), quant.dequantize_blocks(cpu, fmt, x.shape)
    )
