"""Export: PEFT adapters reload on the unmodified base model, merged models reload with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastunlearn.lora import export
from fastunlearn.lora.layer import inject_lora, lora_layers
from tests.helpers.tiny_models import tiny_model, token_batch

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8


def unlearned_model(kind: str, init: str, use_rslora: bool = False) -> torch.nn.Module:
    """A tiny model with adapters after one optimizer step (B moves; so does A when B starts nonzero)."""
    model = tiny_model(kind)
    inject_lora(model, "preset", RANK, ALPHA, init=init, use_rslora=use_rslora)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(seed=2)).logits


def assert_differs_from_base(out: torch.Tensor, kind: str) -> None:
    assert (out - logits(tiny_model(kind))).abs().max() > 1e-3  # else a comparison with the base proves nothing


@pytest.mark.parametrize(
    "kind, init, use_rslora",
    [("gpt_neo", "lora", False), ("gpt_neo", "pissa", False), ("gpt2", "lora", False), ("gpt2", "pissa", True)],
)
def test_peft_adapter_reproduces_the_model_on_the_unmodified_base(tmp_path, kind, init, use_rslora):
    model = unlearned_model(kind, init, use_rslora)
    expected = logits(model)
    assert_differs_from_base(expected, kind)
    out = export.save_peft_adapter(model, tmp_path / "adapter", "tiny/base")
    config = json.loads((out / "adapter_config.json").read_text())
    doubled = init == "pissa"
    assert config["r"] == (2 * RANK if doubled else RANK)
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if use_rslora else config["r"])
    assert scale == pytest.approx(ALPHA / (RANK**0.5 if use_rslora else RANK))
    assert config["fan_in_fan_out"] == (kind == "gpt2") and config["base_model_name_or_path"] == "tiny/base"
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in lora_layers(model) for ab in "AB"}
    reloaded = peft.PeftModel.from_pretrained(tiny_model(kind), out).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_mixed_initial_factors_are_padded_with_zeros(tmp_path):
    model = unlearned_model("gpt_neo", "lora")
    name, layer = next(iter(lora_layers(model).items()))
    layer.init_from_factors(torch.randn_like(layer.lora_a), torch.randn_like(layer.lora_b))  # as FILA would
    with torch.no_grad():
        layer.lora_b.add_(0.1)  # train it a little
    expected = logits(model)
    out = export.save_peft_adapter(model, tmp_path / "adapter")
    tensors = load_file(out / "adapter_model.safetensors")
    other = next(n for n in lora_layers(model) if n != name)
    assert tensors[f"base_model.model.{other}.lora_A.weight"][RANK:].count_nonzero() == 0
    reloaded = peft.PeftModel.from_pretrained(tiny_model("gpt_neo"), out).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_config_matches_what_peft_writes(tmp_path):
    model = unlearned_model("gpt2", "lora")
    ours = json.loads((export.save_peft_adapter(model, tmp_path / "ours") / "adapter_config.json").read_text())
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(lora_layers(model)), fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    peft.get_peft_model(tiny_model("gpt2"), config).save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours["target_modules"], theirs["target_modules"] = sorted(ours["target_modules"]), sorted(theirs["target_modules"])
    assert {key: theirs.get(key, "<missing>") for key in ours} == ours


@pytest.mark.parametrize("kind, init", [("gpt_neo", "pissa"), ("gpt2", "lora")])
def test_merged_model_reloads_with_transformers_and_the_live_model_is_unchanged(tmp_path, kind, init):
    model = unlearned_model(kind, init)
    expected = logits(model)
    assert_differs_from_base(expected, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export.save_merged_model(model, tmp_path / "merged")
    saved = load_file(out / "model.safetensors")
    assert "lora" not in " ".join(saved) and set(saved) <= set(tiny_model(kind).state_dict())
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    layers = lora_layers(model)
    assert layers and not any(layer.merged for layer in layers.values())
    assert torch.equal(logits(model), expected)


def test_merged_export_of_a_merged_model(tmp_path):
    model = unlearned_model("gpt2", "lora")
    expected = logits(model)
    for layer in lora_layers(model).values():
        layer.merge()
    out = export.save_merged_model(model, tmp_path / "merged")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected, atol=1e-5, rtol=1e-5)


def test_failed_writes_leave_no_directory_and_restore_the_model(tmp_path, monkeypatch):
    model = unlearned_model("gpt2", "lora")
    layers = lora_layers(model)

    def write_half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.save_peft_adapter(model, tmp_path / "adapter")

    def save_pretrained_half_then_fail(path, **kwargs):
        assert not lora_layers(model)  # saving sees the plain model
        (path / "config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_pretrained_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.save_merged_model(model, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
    assert lora_layers(model) == layers  # the adapter layers are back in place


def test_non_finite_adapter_fails_before_writing(tmp_path):
    model = unlearned_model("gpt_neo", "lora")
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"merge of LoRA layer {layer.name} gives NaN"):
        export.save_merged_model(model, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_directory(tmp_path):
    model = unlearned_model("gpt_neo", "lora")
    target = tmp_path / "adapter"
    target.mkdir()
    export.save_peft_adapter(model, target)  # an empty directory is filled
    with pytest.raises(FileExistsError, match="is not empty .*overwrite=True"):
        export.save_peft_adapter(model, target)
    (target / "stale.txt").write_text("old")
    export.save_peft_adapter(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        export.save_merged_model(model, tmp_path / "file", overwrite=True)


def test_adapter_export_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="has no LoRA layers: call inject_lora first"):
        export.save_peft_adapter(tiny_model("gpt2"), tmp_path / "adapter")
