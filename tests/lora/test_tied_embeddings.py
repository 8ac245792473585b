"""Tied input/output embeddings (Llama with tie_word_embeddings=True: ``lm_head.weight is
model.embed_tokens.weight``, as in SmolLM2, Gemma, Qwen2-0.5B) through every path of the library: targets,
Fisher, FILA, the fused IHL, both exports and full-parameter unlearning."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fastunlearn import (
    causal_lm_ihl_loss,
    empirical_fisher,
    fila_init,
    inject_lora,
    retain_loss,
    save_merged_model,
    save_peft_adapter,
    shift_causal,
)
from fastunlearn.data.text import UnlearningData
from fastunlearn.engine import UnlearnConfig, checkpoint, unlearn
from fastunlearn.fused_lm import patch_fused_ihl
from fastunlearn.lora.layer import lora_layers
from fastunlearn.lora.targets import find_targets
from fastunlearn.ops.ihl import ihl_loss
from tests.helpers.runs import NEVER, as_set
from tests.helpers.tiny_models import VOCAB, is_tied, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TIED = ("lm_head", "model.embed_tokens")


def ids(seed: int, n: int = 4, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def fila(model: torch.nn.Module) -> dict:
    """FILA on the preset targets, then the adapters moved away from their initial factors (as training would)."""
    fila_init(model, ids(1), ids(2), "preset", rank=2, alpha=4.0)
    layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_a.add_(0.05 * torch.randn_like(layer.lora_a))
            layer.lora_b.add_(0.05 * torch.randn_like(layer.lora_b))
    return layers


def test_the_builder_is_tied():
    model = tiny_llama()
    assert model.config.tie_word_embeddings and is_tied(model)
    assert not is_tied(tiny_llama(tied=False))


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------
def test_preset_targets_never_include_a_tied_weight():
    model = tiny_llama()
    found = find_targets(model, "preset")
    assert found and not any(name.startswith(TIED) for name in found)
    assert all(module.weight is not model.lm_head.weight for module in found.values())


TIED_PATTERN_ENTRY_POINTS = {
    "find_targets": lambda model: find_targets(model, ["q_proj", "lm_head"]),
    "inject_lora": lambda model: inject_lora(model, ["q_proj", "lm_head"], 2, 4.0),
    "empirical_fisher": lambda model: empirical_fisher(model, ids(1), ["lm_head"], progress=False),
    "fila_init": lambda model: fila_init(model, ids(1), ids(2), ["q_proj", "lm_head"], rank=2, alpha=4.0),
}


@pytest.mark.parametrize("entry", list(TIED_PATTERN_ENTRY_POINTS))
def test_a_pattern_that_hits_a_tied_weight_is_refused_naming_it(entry):
    model = tiny_llama()
    before = logits(model, ids(3))
    with pytest.raises(ValueError, match=r"lm_head.*tied|tied.*lm_head"):
        TIED_PATTERN_ENTRY_POINTS[entry](model)
    assert is_tied(model) and not lora_layers(model)  # refused before anything changed
    torch.testing.assert_close(logits(model, ids(3)), before, rtol=0, atol=0)


def test_an_untied_lm_head_can_still_be_targeted():
    model = tiny_llama(tied=False)
    assert list(find_targets(model, ["lm_head"])) == ["lm_head"]


# ---------------------------------------------------------------------------------------------------------
# Fisher and FILA
# ---------------------------------------------------------------------------------------------------------
def test_fisher_of_a_tied_model_is_the_per_example_squared_gradient():
    """F = (1/N) sum_n (dL_n/dW)^2 with L_n the sequence NLL, checked against autograd one sequence at a time."""
    model, data = tiny_llama(), ids(4, n=3)
    result = empirical_fisher(model, data, "preset", progress=False)
    names = list(result.fisher)
    modules = find_targets(model, names)
    expected = {name: torch.zeros_like(f) for name, f in result.fisher.items()}
    for row in data:
        seq = row[None]
        nll = retain_loss(*shift_causal(model(seq).logits, seq), reduction="sum")
        grads = torch.autograd.grad(nll, [modules[name].weight for name in names])
        for name, grad in zip(names, grads):
            expected[name] += grad.square() / len(data)
    for name in names:
        torch.testing.assert_close(result.fisher[name], expected[name], rtol=1e-4, atol=1e-10)
    assert is_tied(model)


def test_fila_init_keeps_the_tie_and_the_function():
    model = tiny_llama()
    before, embedding = logits(model, ids(3)), model.model.embed_tokens.weight.detach().clone()
    fila_init(model, ids(1), ids(2), "preset", rank=2, alpha=4.0)
    assert is_tied(model) and not any(name.startswith(TIED) for name in lora_layers(model))
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(logits(model, ids(3)), before, rtol=1e-5, atol=1e-5)  # W0 - sBA + sBA


# ---------------------------------------------------------------------------------------------------------
# The fused IHL
# ---------------------------------------------------------------------------------------------------------
def test_fused_ihl_value_and_every_gradient_tied_weight_included_equal_the_logits_path():
    reference, fused = tiny_llama(), patch_fused_ihl(tiny_llama())
    batch = ids(5, n=3, length=9)
    mask = torch.ones_like(batch)
    mask[1, -3:] = 0  # right padding
    expected = causal_lm_ihl_loss(reference(batch, attention_mask=mask).logits, batch, mask)
    expected.backward()
    calls = []
    fused.lm_head.register_forward_hook(lambda *args: calls.append(1))
    value = fused(batch, attention_mask=mask, ihl=True).loss
    value.backward()
    assert not calls  # the output layer is never called, only its (shared) weight read
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    grads = dict(fused.named_parameters())
    for name, param in reference.named_parameters():  # the tied tensor appears once, as model.embed_tokens.weight
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused.lm_head.weight.grad is fused.model.embed_tokens.weight.grad
    assert fused.model.embed_tokens.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------------------
def test_merged_checkpoint_reloads_identically_and_still_tied(tmp_path):
    model = tiny_llama()
    fila(model)
    expected = logits(model, ids(3))
    out = save_merged_model(model, tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # one tensor for both
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert is_tied(reloaded)
    torch.testing.assert_close(logits(reloaded, ids(3)), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_on_the_unmodified_tied_base_reproduces_the_model(tmp_path):
    model = tiny_llama()
    fila(model)
    expected = logits(model, ids(3))
    out = save_peft_adapter(model, tmp_path / "adapter", "tiny/tied-llama")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(reloaded, ids(3)), expected, rtol=1e-5, atol=1e-5)
    assert is_tied(reloaded.get_base_model())


# ---------------------------------------------------------------------------------------------------------
# Full-parameter unlearning
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused_ihl", [False, True])
def test_full_unlearning_updates_the_shared_tensor_once_with_the_gradient_of_both_uses(tmp_path, fused_ihl):
    """One epoch (one micro-batch of each set) = one AdamW step on IHL(forget) / n_f + CE(retain) / n_r; the
    checkpoint holds the tied tensor once and its AdamW first moment is (1 - beta1) x the full gradient."""
    forget, retain, heldout = ids(6), ids(7), ids(8)
    lr, betas = 1e-3, (0.9, 0.98)
    reference = tiny_llama()
    params = list(reference.parameters())  # the tied tensor once
    n_f, n_r = forget[:, 1:].numel(), retain[:, 1:].numel()
    loss = ihl_loss(*shift_causal(reference(forget).logits, forget), reduction="sum") / n_f
    loss = loss + retain_loss(*shift_causal(reference(retain).logits, retain), reduction="sum") / n_r
    loss.backward()
    gradient = reference.model.embed_tokens.weight.grad.clone()
    torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0).step()

    seen = {}

    def grab(task, record):
        newest = max(checkpoint.versions(tmp_path / "run").items())[1]
        with safe_open(str(newest / "state.safetensors"), "pt") as f:
            seen["keys"] = [k for k in f.keys() if k.startswith("param.")]
            index = [k.removeprefix("param.") for k in seen["keys"]].index("model.embed_tokens.weight")
            seen["exp_avg"] = f.get_tensor(f"optim.{index}.exp_avg")

    model = tiny_llama()
    data = UnlearningData(as_set(forget), as_set(retain), as_set(heldout))
    config = UnlearnConfig(params="full", lr=lr, betas=betas, max_epochs=1, micro_batch_size=8, el_n=3,
                           fused_ihl=fused_ihl, **NEVER)  # fmt: skip
    result = unlearn(model, data, config, tmp_path / "run", on_epoch_end=grab)
    assert is_tied(model) and result.log["tasks"][0]["epochs"][0]["updated"]
    assert sum(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in seen["keys"]) == 1
    scale = gradient.abs().max().item()
    torch.testing.assert_close(seen["exp_avg"], (1 - betas[0]) * gradient, rtol=1e-4, atol=1e-6 * scale)
    trained = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        # an AdamW step moves a weight by about lr where |g| >> eps: 1% of it allows any summation order
        torch.testing.assert_close(
            trained[name], param, rtol=0, atol=1e-2 * lr, msg=lambda m, name=name: f"{name}: {m}"
        )
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir / "merged").eval()
    assert is_tied(merged)
    torch.testing.assert_close(logits(merged, heldout), logits(model, heldout), rtol=1e-5, atol=1e-5)
