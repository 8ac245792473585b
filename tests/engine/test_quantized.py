"""fastunlearn.engine.quantized: the deployed weights of a model with LoRA / FILA adapters are the MERGED weights
round-tripped (never W0 and the adapter apart), GPT-2's Conv1D weights are quantized in (out, in) rows, the
straight-through forward's gradient is the plain gradient taken at the quantized weights (equal to the plain one
at grid points), and every context puts the weights back bit for bit, also after an error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastunlearn.engine.quantized import DeployWeights
from fastunlearn.lora.export import merged_state_dict
from fastunlearn.lora.layer import LoRALinear, inject_lora, lora_layers
from fastunlearn.ops import quant
from tests.helpers.tiny_gguf import tiny_llama
from tests.helpers.tiny_models import VOCAB, tiny_model, token_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_batch() if ids is None else ids).logits


def trained_adapters(model, kind: str = "lora", seed: int = 0) -> None:
    """Adapters on every preset layer with non-zero factors (as after training); kind "fila": factor-initialized
    (base weight W0 - s B0 A0) then moved away from the initial factors."""
    layers = inject_lora(model, "preset", rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            if kind == "fila":
                layer.init_from_factors(0.1 * torch.randn(layer.lora_a.shape, generator=gen),
                                        0.1 * torch.randn(layer.lora_b.shape, generator=gen))  # fmt: skip
            layer.lora_a.add_(0.05 * torch.randn(layer.lora_a.shape, generator=gen))
            layer.lora_b.add_(0.05 * torch.randn(layer.lora_b.shape, generator=gen))


def plain_copy(model, merged: dict[str, torch.Tensor], kind: str):
    """A model without adapters holding ``merged``."""
    fresh = tiny_model(kind)
    fresh.load_state_dict(merged)
    return fresh


@pytest.mark.parametrize("adapters", ["lora", "fila"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_deployed_is_the_merged_model_round_tripped_and_is_undone_exactly(adapters, fmt):
    model = tiny_model("gpt_neo")
    weights = DeployWeights.of(model, fmt)
    trained_adapters(model, adapters)
    expected = plain_copy(model, merged_state_dict(model), "gpt_neo")
    quant.roundtrip_model(expected, fmt, backup=False, progress=False)
    before, float_logits = state(model), logits(model)
    with weights.deployed(model):
        deployed = logits(model)
    torch.testing.assert_close(deployed, logits(expected), rtol=0, atol=1e-5)
    assert not torch.allclose(deployed, float_logits, atol=1e-3)  # the quantization shows: the test can fail
    apart = copy.deepcopy(model)  # the base weight quantized, the adapter added in float: another model
    with torch.no_grad():
        for layer in lora_layers(apart).values():
            layer.base.weight.copy_(quant.roundtrip(layer.base.weight, fmt))
    assert not torch.allclose(logits(apart), deployed, atol=1e-4)
    assert same_state(model, before) and not any(layer.merged for layer in lora_layers(model).values())
    assert torch.equal(logits(model), float_logits)


def test_full_weights_embeddings_and_tied_head_are_round_tripped_once():
    model = tiny_model("gpt_neo")
    weights = DeployWeights.of(model, "q4_0")
    assert "lm_head.weight" not in weights.formats and "transformer.wte.weight" in weights.formats  # tied: once
    assert all(name.endswith("weight") and "ln" not in name for name in weights.formats)  # norms stay float
    expected = copy.deepcopy(model)
    quant.roundtrip_model(expected, "q4_0", backup=False, progress=False)
    before = state(model)
    with weights.deployed(model):
        assert torch.equal(logits(model), logits(expected))
        assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert same_state(model, before)


def test_nf4_takes_the_linear_layers_but_the_output_layer_as_bitsandbytes_does():
    model = tiny_model("gpt2")  # Conv1D layers: (in, out) rows of 32 fit NF4 transposed, as (out, in) rows of 32...
    with pytest.raises(ValueError, match="cannot be stored as nf4"):  # ... do not: 32 is no multiple of 64
        DeployWeights.of(model, "nf4")
    llama = tiny_llama()
    weights = DeployWeights.of(llama, "nf4")
    assert "model.layers.0.self_attn.q_proj.weight" in weights.formats and "lm_head.weight" not in weights.formats
    assert "model.embed_tokens.weight" not in weights.formats and set(weights.formats.values()) == {"nf4"}
    assert len(weights.formats) == 7 * llama.config.num_hidden_layers


def test_conv1d_weights_are_quantized_in_out_by_in_rows():
    model = tiny_model("gpt2")
    weights = DeployWeights.of(model, "q4_1")
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: stored (in=32, out=96)
    assert name in weights.transposed and "transformer.wte.weight" not in weights.transposed
    w = model.get_parameter(name).detach().clone()
    with weights.deployed(model):
        got = model.get_parameter(name).detach().clone()
    assert torch.equal(got, quant.roundtrip(w.t().contiguous(), "q4_1").t())
    assert not torch.equal(got, quant.roundtrip(w, "q4_1"))  # the other axis differs: the test can fail
    trained_adapters(model)  # adapted Conv1D layers: merged in the base layout, then transposed
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    merged = layer.merged_weight()
    with weights.deployed(model):
        assert torch.equal(layer.base.weight, quant.roundtrip(merged.t().contiguous(), "q4_1").t())


def test_a_weight_that_does_not_fit_the_format_is_named_before_anything_changes():
    model = tiny_model("gpt_neo")  # hidden 32: NF4's blocks of 64 do not fit
    with pytest.raises(
        ValueError,
        match=r"parameter 'transformer.h.0.attn.attention.k_proj.weight' of shape \(32, 32\) "
        "cannot be stored as nf4: its rows of 32 weights are no multiple of the format's block of 64",
    ):
        DeployWeights.of(model, "nf4")
    with pytest.raises(ValueError, match="formats name parameters the model does not have: nope"):
        DeployWeights.of(model, {"nope": "q4_1"})
    plan = DeployWeights.of(model, {"transformer.wte.weight": "q8_0", "transformer.ln_f.weight": "f32"})
    assert plan.formats == {"transformer.wte.weight": "q8_0"}  # f32 round trips change nothing: skipped
    inject_lora(model, "preset", rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="before adapters are injected"):
        DeployWeights.of(model, "q4_1")


def test_an_error_inside_the_block_still_restores_every_weight():
    model = tiny_model("gpt_neo")
    weights = DeployWeights.of(model, "q4_1")
    trained_adapters(model)
    before = state(model)
    for context in (weights.deployed, weights.straight_through):
        with pytest.raises(RuntimeError, match="boom"), context(model):
            assert not same_state(model, before)
            raise RuntimeError("boom")
        assert same_state(model, before) and not any(layer.merged for layer in lora_layers(model).values())


# ---------------------------------------------------------------------------------------------------------
# The straight-through forward
# ---------------------------------------------------------------------------------------------------------
def lora_layer(seed: int = 0, on_grid: bool = False) -> LoRALinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(64, 48)
    if on_grid:
        with torch.no_grad():
            base.weight.copy_(quant.roundtrip(base.weight, "q4_1"))
    layer = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.02)
    return layer


def adapter_grads(layer, x, g, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(g * tanh(y)) for A and B (tanh: they depend on the weight), through the module (ste: in
    straight_through)."""
    model = torch.nn.Sequential()
    model.add_module("proj", layer.base)
    weights = DeployWeights.of(model, "q4_1")
    model.proj = layer
    layer.lora_a.grad = layer.lora_b.grad = None
    with weights.straight_through(model) if ste else torch.enable_grad():
        (torch.tanh(model(x)) * g).sum().backward()
    return layer.lora_a.grad.clone(), layer.lora_b.grad.clone()


def test_straight_through_gradient_is_the_plain_gradient_taken_at_the_quantized_weight():
    """Off the grid: d/dA, d/dB of sum(g * tanh(x Q(W)^T + b)) with W = W0 + s B A and dQ/dW := identity, in
    float64 by autograd on an explicit STE expression."""
    layer = lora_layer()
    x, g = 3 * torch.randn(5, 64), torch.randn(5, 48)
    got_a, got_b = adapter_grads(layer, x, g, ste=True)
    a, b = layer.lora_a.detach().double().requires_grad_(), layer.lora_b.detach().double().requires_grad_()
    w = layer.base.weight.detach().double() + layer.scale * b @ a
    wq = w + (quant.roundtrip(w.detach().float(), "q4_1").double() - w).detach()
    (torch.tanh(F.linear(x.double(), wq, layer.base.bias.detach().double())) * g.double()).sum().backward()
    torch.testing.assert_close(got_a, a.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_b, b.grad.float(), rtol=1e-4, atol=1e-6)
    plain_a, _ = adapter_grads(layer, x, g, ste=False)
    assert not torch.allclose(plain_a, got_a, rtol=1e-3)  # off the grid the two differ: the test can fail


def test_at_grid_points_the_straight_through_gradient_equals_the_plain_one():
    layer = lora_layer(on_grid=True)
    with torch.no_grad():
        layer.lora_b.zero_()  # W0 + s B A = W0, on the grid
    x, g = torch.randn(5, 64), torch.randn(5, 48)
    for got, plain in zip(adapter_grads(layer, x, g, ste=True), adapter_grads(layer, x, g, ste=False)):
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-7)
    model = tiny_model("gpt_neo")  # full weights on the grid: the same gradients bit for bit
    quant.roundtrip_model(model, "q4_1", backup=False, progress=False)
    weights, ids = DeployWeights.of(model, "q4_1"), token_batch()
    grads = []
    for ste in (False, True):
        model.zero_grad()
        with weights.straight_through(model) if ste else torch.enable_grad():
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_straight_through_full_weights_get_the_gradient_at_q_of_w_and_keep_w():
    model = tiny_model("gpt_neo")
    weights, ids = DeployWeights.of(model, "q4_1"), token_batch()
    before = state(model)
    at_q = copy.deepcopy(model)
    quant.roundtrip_model(at_q, "q4_1", backup=False, progress=False)
    at_q(ids, labels=ids).loss.backward()
    with weights.straight_through(model):
        model(ids, labels=ids).loss.backward()
    assert same_state(model, before)  # W is back: the optimizer steps from it
    for (name, p), (_, q) in zip(model.named_parameters(), at_q.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert VOCAB == model.config.vocab_size
