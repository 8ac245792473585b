"""The fused IHL of a Hugging Face causal LM equals causal_lm_ihl_loss on its logits, in value and in every
gradient, without calling its output layer; the per-instance patch leaves every other call unchanged."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastunlearn import causal_lm_ihl_loss, inject_lora
from fastunlearn.integrations.patch import (
    check_fused_ihl_support,
    fused_causal_lm_ihl,
    is_fused_ihl_patched,
    patch_fused_ihl,
    unpatch_fused_ihl,
)
from tests.helpers.reference import assert_close_verbose
from tests.helpers.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def make_model(kind: str) -> torch.nn.Module:
    """Tiny, float32, eval mode; ``llama_bias`` has an output layer with a bias, ``llama_big_vocab`` V > 65536."""
    if kind in ("gpt_neo", "gpt2"):
        return tiny_model(kind)
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, num_key_value_heads=1, **SMALL)).eval()
    if kind == "llama_big_vocab":
        config = LlamaConfig(
            vocab_size=70_000, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1
        )
        return LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **SMALL)).eval()
    if kind == "llama_bias":
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    return model


def make_batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (3, 9) with right padding in row 1 and left padding in row 2; labels with ignored positions."""
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3:5] = -100
    return ids, mask, labels


def loss_and_grads(model, loss_fn, weights=None):
    """(loss, {name: grad}) of ``loss_fn()`` (weighted sum for reduction="none") over the trainable parameters."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss if weights is None else (loss * weights).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_loss_and_grads(model, fused_fn, unfused_fn, weights=None):
    loss, grads = loss_and_grads(model, fused_fn, weights)
    ref_loss, ref_grads = loss_and_grads(model, unfused_fn, weights)
    assert loss.shape == ref_loss.shape
    assert_close_verbose(loss, ref_loss, 1e-6, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():
        assert_close_verbose(grads[name], ref, 1e-6 * ref.abs().max().item() + 1e-9, 1e-4, f"grad {name}")
    return grads


class CallCounter:
    """Counts the forward calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama", "qwen2", "llama_bias", "llama_big_vocab"])
def test_fused_matches_unfused_in_value_and_every_gradient(kind):
    model = make_model(kind)
    ids, mask, labels = make_batch(model.config.vocab_size)
    grads = assert_same_loss_and_grads(
        model,
        lambda: fused_causal_lm_ihl(model, ids, mask, labels=labels, margin=0.7, chunk_rows=5),
        lambda: causal_lm_ihl_loss(model(ids, attention_mask=mask).logits, ids, mask, labels=labels, margin=0.7),
    )  # fmt: skip
    head = model.get_output_embeddings()
    head_grad = next(g for name, g in grads.items() if model.get_parameter(name) is head.weight)
    assert torch.count_nonzero(head_grad) > 0  # tied (GPT-2, GPT-Neo, Qwen2) or not, the head weight learns


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patched_forward_reduction_none_and_input_ids_targets(kind):
    model = patch_fused_ihl(make_model(kind), reduction="none")
    ids, mask, _ = make_batch()
    weights = torch.rand(3, 8, generator=torch.Generator().manual_seed(4))
    assert_same_loss_and_grads(
        model,
        lambda: model(ids, attention_mask=mask, ihl=True).loss,
        lambda: causal_lm_ihl_loss(model(ids, attention_mask=mask).logits, ids, mask, reduction="none"),
        weights,
    )
    mean = model(input_ids=ids, attention_mask=mask, ihl=True, reduction="mean").loss  # per-call override
    expected = causal_lm_ihl_loss(model(ids, attention_mask=mask).logits, ids, mask)
    assert_close_verbose(mean, expected, 1e-6, 1e-5, "mean")


def test_fused_path_never_calls_the_output_layer():
    model = patch_fused_ihl(make_model("llama"))
    ids, mask, labels = make_batch()
    counter = CallCounter(model.lm_head)
    out = model(ids, attention_mask=mask, labels=labels, ihl=True)
    out.loss.backward()
    assert counter.calls == 0 and out.logits is None and out.loss.dim() == 0
    assert_close_verbose(out.loss, fused_causal_lm_ihl(model, ids, mask, labels=labels), 0, 0, "patched loss")
    assert model(ids, attention_mask=mask).logits.shape == (3, 9, VOCAB)
    assert counter.calls == 1


def test_other_calls_unchanged_and_unpatch_restores():
    model = make_model("gpt2")
    ids, mask, _ = make_batch()
    prompt = ids[:1, :4]
    signature = inspect.signature(model.forward)
    before = model(ids, attention_mask=mask, labels=ids)
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert patch_fused_ihl(model) is model and patch_fused_ihl(model, margin=0.5) is model  # idempotent
    assert is_fused_ihl_patched(model) and not is_fused_ihl_patched(make_model("gpt2"))  # per instance
    assert inspect.signature(model.forward) == signature
    after = model(ids, attention_mask=mask, labels=ids)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0), generated)
    clone = copy.deepcopy(model)  # the copy's fused path runs the copy
    with torch.no_grad():
        clone.lm_head.weight.mul_(3.0)
    assert clone(ids, ihl=True).loss != model(ids, ihl=True).loss
    assert_close_verbose(clone(ids, ihl=True).loss, fused_causal_lm_ihl(clone, ids, margin=0.5), 0, 0, "deepcopy")
    assert unpatch_fused_ihl(model) is model and not is_fused_ihl_patched(model)
    assert "forward" not in vars(model) and unpatch_fused_ihl(model) is model  # unpatching twice is a no-op
    assert torch.equal(model(ids, attention_mask=mask, labels=ids).loss, before.loss)


def test_patched_forward_rejects_positional_arguments_after_input_ids():
    model = patch_fused_ihl(make_model("gpt_neo"))
    ids, mask, _ = make_batch()
    with pytest.raises(TypeError, match="only input_ids may be positional"):
        model(ids, mask, ihl=True)


def test_gradients_reach_lora_adapters_in_attention():
    model = make_model("gpt_neo")
    layers = inject_lora(model, "preset", 2, 4.0)
    for layer in layers.values():  # B != 0: both factors get a gradient
        torch.nn.init.normal_(layer.lora_b, std=0.1)
    ids, mask, labels = make_batch()
    grads = assert_same_loss_and_grads(
        model,
        lambda: fused_causal_lm_ihl(model, ids, mask, labels=labels),
        lambda: causal_lm_ihl_loss(model(ids, attention_mask=mask).logits, ids, mask, labels=labels),
    )
    assert set(grads) == {f"{name}.{factor}" for name in layers for factor in ("lora_a", "lora_b")}
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())


def tiny_config_kwargs() -> dict:
    return {
        "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    }  # fmt: skip


def lora_head_model() -> torch.nn.Module:
    model = make_model("llama")
    inject_lora(model, ["lm_head"], 2, 4.0)
    return model


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lora_head_model, "LoRALinear.*merge"),
        (lambda: Gemma2ForCausalLM(Gemma2Config(head_dim=8, **tiny_config_kwargs())), "final_logit_softcapping"),
        (lambda: CohereForCausalLM(CohereConfig(**tiny_config_kwargs())), "logit_scale"),
        (lambda: LlamaForSequenceClassification(LlamaConfig(**tiny_config_kwargs())), "no output layer"),
        (lambda: GPT2Model(tiny_model("gpt2").config), "no backbone"),
        (lambda: torch.nn.Linear(4, 4), "no backbone"),
    ],
    ids=["lora_head", "gemma2_softcap", "cohere_logit_scale", "no_head", "base_model", "not_a_causal_lm"],
)
def test_refusals(build, match):
    model = build()
    ids, _, _ = make_batch()
    for call in (check_fused_ihl_support, patch_fused_ihl, lambda m: fused_causal_lm_ihl(m, ids)):
        with pytest.raises(ValueError, match=match):
            call(model)
    assert not is_fused_ihl_patched(model)


def test_forwards_overridden_on_the_instance_are_refused():
    model = make_model("gpt_neo")
    model.lm_head.forward = model.lm_head.forward  # as accelerate's hooks do
    with pytest.raises(ValueError, match="output layer .* overridden on the instance"):
        check_fused_ihl_support(model)
    model = make_model("gpt_neo")
    model.forward = model.forward
    with pytest.raises(ValueError, match="model.forward is already overridden"):
        patch_fused_ihl(model)


def test_lora_on_the_head_after_patching_is_refused_at_call_time():
    model = patch_fused_ihl(make_model("llama"))
    inject_lora(model, ["lm_head"], 2, 4.0)
    ids, _, _ = make_batch()
    with pytest.raises(ValueError, match="plain nn.Linear"):
        model(ids, ihl=True)


def test_invalid_options_fail_before_running_the_model():
    model = make_model("gpt_neo")
    ids, _, _ = make_batch()
    counter = CallCounter(model.transformer)
    with pytest.raises(ValueError, match="reduction"):
        fused_causal_lm_ihl(model, ids, reduction="avg")
    with pytest.raises(ValueError, match="chunk_rows"):
        patch_fused_ihl(model, chunk_rows=0)
    assert counter.calls == 0 and not is_fused_ihl_patched(model)
