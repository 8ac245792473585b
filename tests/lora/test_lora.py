"""LoRALinear: forward math, merge, initializations, injection into tiny GPT-Neo / GPT-2, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastunlearn.lora.layer import LoRALinear, inject_lora, lora_layers, trainable_parameters
from tests.helpers.tiny_models import tiny_model, token_batch

N_IN, N_OUT, RANK, ALPHA = 12, 10, 3, 6.0


def make_base(kind: str, dtype=torch.float32) -> nn.Module:
    base = nn.Linear(N_IN, N_OUT) if kind == "linear" else Conv1D(N_OUT, N_IN)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias, std=0.1)
    return base.to(dtype)


def w_out_in(base: nn.Module) -> torch.Tensor:
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def randomize_adapter(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_a.normal_(std=0.3)
        layer.lora_b.normal_(std=0.3)


def formula(x, w_oi, bias, a, b, scale) -> torch.Tensor:
    """y = W0 x + b + scale B A x in float64."""
    x, w_oi, bias, a, b = (t.detach().double() for t in (x, w_oi, bias, a, b))
    return x @ w_oi.t() + bias + scale * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_matches_formula(kind, use_rslora):
    base = make_base(kind)
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.5, use_rslora=use_rslora).eval()
    assert layer.scale == (ALPHA / math.sqrt(RANK) if use_rslora else ALPHA / RANK)
    assert layer.lora_a.shape == (RANK, N_IN) and layer.lora_b.shape == (N_OUT, RANK)
    assert layer.base is base and not base.weight.requires_grad
    x = torch.randn(2, 5, N_IN)
    assert torch.equal(layer(x), base(x))  # B = 0 at the LoRA init
    randomize_adapter(layer)
    expected = formula(x, w_out_in(base), base.bias, layer.lora_a, layer.lora_b, layer.scale)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer.train()(x).double(), expected, atol=1e-3)  # dropout acts in training only


def test_lora_init_is_kaiming_uniform_like_nn_linear():
    layer = LoRALinear(nn.Linear(256, 64), 16, 16.0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in = in
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.9 * bound
    assert layer.lora_b.count_nonzero() == 0 and layer.lora_a0 is None


def test_gradients_reach_only_the_adapters():
    layer = LoRALinear(make_base("linear"), RANK, ALPHA)
    randomize_adapter(layer)
    layer(torch.randn(4, N_IN)).square().sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip_fp32(kind):
    layer = LoRALinear(make_base(kind), RANK, ALPHA)
    randomize_adapter(layer)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, N_IN)
    y = layer(x)
    merged_copy = layer.merged_weight()
    assert torch.equal(layer.base.weight, w0)  # merged_weight() does not touch the live weight
    layer.merge()
    assert layer.merged and torch.equal(layer.base.weight, merged_copy)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # the adapter is not added twice
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="is not merged"):
        layer.unmerge()


def test_merge_unmerge_bf16_within_rounding():
    layer = LoRALinear(make_base("linear", torch.bfloat16), RANK, ALPHA)
    randomize_adapter(layer)
    w0 = layer.base.weight.detach().float().clone()
    delta = layer.scale * layer.lora_b.detach() @ layer.lora_a.detach()
    layer.merge()
    ulp = 2.0**-7 * (w0.abs() + delta.abs())  # bf16 spacing (eps 2^-7) at |W| + |delta| >= |W + delta|
    assert ((layer.base.weight.float() - (w0 + delta)).abs() <= ulp / 2).all()
    layer.unmerge()
    assert ((layer.base.weight.float() - w0).abs() <= ulp).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_weights(bad):
    layer = LoRALinear(make_base("linear"), RANK, ALPHA, name="h.0.q_proj")
    randomize_adapter(layer)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_b[0, 0] = bad
    with pytest.raises(ValueError, match=r"merge of LoRA layer h\.0\.q_proj gives NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_takes_the_top_singular_triplets_and_keeps_outputs(kind):
    base = make_base(kind)
    original = copy.deepcopy(base)
    layer = LoRALinear(base, RANK, ALPHA)
    layer.init_pissa()
    x = torch.randn(4, N_IN)
    torch.testing.assert_close(layer(x), original(x), atol=1e-5, rtol=1e-5)
    w0 = w_out_in(original).detach()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    root = (s[:RANK] / layer.scale).sqrt()
    torch.testing.assert_close(layer.lora_a, root[:, None] * vh[:RANK], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_b, u[:, :RANK] * root, atol=1e-5, rtol=1e-5)
    residual = w0 - (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    torch.testing.assert_close(w_out_in(layer.base), residual, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.lora_a0, layer.lora_a) and not layer.lora_a0.requires_grad


def test_init_from_factors_keeps_outputs_and_reset_restores_the_weight():
    base = make_base("conv1d")
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, RANK, ALPHA)
    x = torch.randn(5, N_IN)
    y = layer(x)
    a, b = torch.randn(RANK, N_IN, dtype=torch.float64), torch.randn(N_OUT, RANK, dtype=torch.float64)
    layer.init_from_factors(a, b)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert layer.lora_a.dtype == torch.float32 and torch.equal(layer.lora_b, b.float())
    torch.testing.assert_close(base.weight.t(), w0.t() - layer.scale * b.float() @ a.float(), atol=1e-5, rtol=0)
    layer.init_from_factors(2 * a, b)  # a second init starts from the original weight
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.reset_lora()
    assert layer.lora_a0 is None and layer.lora_b.count_nonzero() == 0
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_init_from_factors_rejects_bad_factors():
    layer = LoRALinear(make_base("linear"), RANK, ALPHA, name="mlp.c_fc")
    shape_error = r"a must be a float tensor of shape \(3, 12\) for layer mlp\.c_fc, got \(12, 3\)"
    with pytest.raises(ValueError, match=shape_error):
        layer.init_from_factors(torch.zeros(N_IN, RANK), torch.zeros(N_OUT, RANK))
    with pytest.raises(ValueError, match="b must be a float tensor"):
        layer.init_from_factors(torch.zeros(RANK, N_IN), torch.zeros(N_OUT, RANK, dtype=torch.int64))
    with pytest.raises(ValueError, match="init_from_factors of LoRA layer mlp.c_fc gives NaN"):
        layer.init_from_factors(torch.full((RANK, N_IN), float("nan")), torch.ones(N_OUT, RANK))
    layer.merge()
    with pytest.raises(RuntimeError, match="is merged: unmerge"):
        layer.init_pissa()


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_disabled_gives_the_original_layer(init):
    base = make_base("linear")
    original = copy.deepcopy(base)
    layer = LoRALinear(base, RANK, ALPHA)
    if init == "pissa":
        layer.init_pissa()
    randomize_adapter(layer)  # "trained"
    x = torch.randn(4, N_IN)
    assert not torch.allclose(layer(x), original(x), atol=1e-3)
    layer.disabled = True
    torch.testing.assert_close(layer(x), original(x), atol=1e-5, rtol=1e-5)
    layer.disabled = False
    layer.merge()
    layer.disabled = True
    with pytest.raises(RuntimeError, match="is merged: unmerge"):
        layer(x)


def test_bf16_base_keeps_float32_adapters():
    base = make_base("linear", torch.bfloat16)
    original = copy.deepcopy(base)
    layer = LoRALinear(base, RANK, ALPHA)
    layer.init_pissa()
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    x = torch.randn(4, N_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), original(x).float(), atol=0.05, rtol=2**-6)
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("gpt_neo", {"attn.attention.q_proj", "attn.attention.v_proj", "mlp.c_fc", "mlp.c_proj"}),
        ("gpt2", {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}),
    ],
)
@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_inject_preset_into_tiny_models(kind, expected, init):
    model = tiny_model(kind)
    ids = token_batch()
    reference = model(ids).logits
    layers = inject_lora(model, "preset", 4, 8, init=init)
    assert {name.split(".", 3)[3] for name in layers} == expected and len(layers) == 2 * len(expected)
    assert lora_layers(model) == layers and all(model.get_submodule(n) is m for n, m in layers.items())
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "ab"}
    n_trainable, n_total, percent = trainable_parameters(model)
    assert n_trainable == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert n_total == sum(p.numel() for p in model.parameters())
    assert percent == pytest.approx(100 * n_trainable / n_total) and 0 < percent < 100


def test_inject_rejects_bad_input():
    model = tiny_model("gpt2")
    rank_error = r"rank must be an integer in \[1, min\(out, in\) = 32\] for layer transformer\.h\.0\.attn\.c_attn"
    with pytest.raises(ValueError, match=rank_error):
        inject_lora(model, "preset", 33, 8)
    with pytest.raises(ValueError, match="rank must be an integer .* got 0"):
        inject_lora(model, "preset", 0, 8)
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0, got"):
            inject_lora(model, "preset", 4, alpha)
    for dropout in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got"):
            inject_lora(model, "preset", 4, 8, dropout=dropout)
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] match no nn.Linear or Conv1D layer"):
        inject_lora(model, ["q_proj"], 4, 8)
    with pytest.raises(ValueError, match="init must be one of"):
        inject_lora(model, "preset", 4, 8, init="fila")
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    inject_lora(model, "preset", 4, 8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject_lora(model, "preset", 4, 8)
    with pytest.raises(TypeError, match="base must be an nn.Linear or a transformers Conv1D, got Embedding"):
        LoRALinear(nn.Embedding(4, 4), 1, 1.0)
