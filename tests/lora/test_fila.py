"""FILA: Fisher-weighted SVD initialization of LoRA leaves the model unchanged and is the weighted optimum."""

from __future__ import annotations

import copy

import pytest
import torch

from fastunlearn.lora.fila import FilaConfig, fila_init, lora_factors, row_weights_from_fisher
from fastunlearn.lora.fisher import relative_fisher
from fastunlearn.lora.layer import inject_lora, trainable_parameters
from fastunlearn.lora.targets import find_targets, weight_out_in
from fastunlearn.ops.lowrank import LowRank
from tests.helpers.reference import assert_close_verbose
from tests.helpers.tiny_models import KINDS, VOCAB, tiny_model


def data(seed: int, n: int = 6, t: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


FORGET, RETAIN, PROBE = data(1), data(2), data(3)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fisher_mode", ["per_example", "per_batch"])
def test_model_unchanged_at_init_and_only_adapters_train(kind, fisher_mode):
    model = tiny_model(kind)
    before = logits(model)
    result = fila_init(model, FORGET, RETAIN, "preset", rank=4, alpha=8.0, fisher_mode=fisher_mode)
    assert_close_verbose(logits(model), before, 2e-5, 1e-4, "logits after FILA init")
    trainable, total, percent = trainable_parameters(model)
    assert trainable == sum(layer.lora_a.numel() + layer.lora_b.numel() for layer in result.layers.values())
    assert 0 < percent < 100 and trainable < total
    for layer in result.layers.values():  # the adapters start on the Fisher-weighted top directions
        assert layer.lora_b.abs().sum() > 0


def test_row_weights_and_factors_are_the_weighted_optimum():
    model = tiny_model("gpt_neo")
    original = {name: weight_out_in(m).detach().double().clone() for name, m in find_targets(model, "preset").items()}
    result = fila_init(model, FORGET, RETAIN, "preset", rank=3, alpha=6.0, exact=True)
    relative = relative_fisher(result.forget_fisher, result.retain_fisher, 1e-5)
    modules = {name: layer.base for name, layer in result.layers.items()}
    expected_w = row_weights_from_fisher(relative, modules)
    for name, layer in result.layers.items():
        w = result.row_weights[name].double()
        assert torch.equal(result.row_weights[name], expected_w[name])
        assert torch.allclose(w, relative[name].double().sum(1).sqrt())  # w_i = sqrt(sum_j F_rel[i, j])
        # scale * B A is the best rank-3 approximation of W in the diag(w)-weighted Frobenius norm
        u, s, vh = torch.linalg.svd(w[:, None] * original[name], full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3] / w[:, None]
        got = layer.scale * layer.lora_b.double() @ layer.lora_a.double()
        assert_close_verbose(w[:, None] * got, w[:, None] * best, 1e-5 * s[0].item(), 1e-4, f"{name} W_r")


def test_ones_weighting_is_pissa_and_uniform_weighting_only_rescales():
    ones = tiny_model("gpt2")
    pissa = copy.deepcopy(ones)
    fila_ones = fila_init(ones, FORGET, RETAIN, "preset", rank=2, alpha=4.0, row_weighting="ones", exact=True)
    pissa_layers = inject_lora(pissa, "preset", 2, 4.0, init="pissa")
    for name, layer in fila_ones.layers.items():
        product = layer.lora_b @ layer.lora_a
        assert_close_verbose(product, pissa_layers[name].lora_b @ pissa_layers[name].lora_a, 1e-5, 1e-4, name)
    uniform = fila_init(tiny_model("gpt2"), FORGET, RETAIN, "preset", rank=2, alpha=4.0, row_weighting="uniform",
                        exact=True)  # fmt: skip
    for name, layer in uniform.layers.items():
        w = uniform.row_weights[name]
        assert torch.all(w == w[0])  # one weight for every row
        assert_close_verbose(layer.lora_b @ layer.lora_a, fila_ones.layers[name].lora_b @ fila_ones.layers[name].lora_a,
                             1e-5, 1e-4, f"{name} uniform = plain SVD product")  # fmt: skip


def test_zero_row_weights_give_zero_rows_of_b():
    U = torch.tensor([[0.6, 0.0], [0.0, 0.0], [0.8, 1.0]])
    low = LowRank(U, torch.tensor([4.0, 1.0]), torch.eye(2))
    a, b = lora_factors(low, torch.tensor([2.0, 0.0, 1.0]), scale=2.0)
    assert torch.isfinite(b).all() and torch.equal(b[1], torch.zeros(2))
    expected = torch.tensor([[0.6 * 4 / 2, 0.0], [0.0, 0.0], [0.8 * 4, 1.0]])  # diag(1/w) U S Vᵀ, 1/0 -> 0
    assert torch.allclose(2.0 * b @ a, expected, atol=1e-6)


def test_training_moves_the_model_and_export_reproduces_it(tmp_path):
    peft = pytest.importorskip("peft")
    from fastunlearn.lora.export import save_peft_adapter

    model = tiny_model("gpt_neo")
    fila_init(model, FORGET, RETAIN, "preset", rank=2, alpha=4.0)
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(FORGET, labels=FORGET).loss
    loss.backward()
    optim.step()
    after = logits(model)
    assert not torch.allclose(after, logits(tiny_model("gpt_neo")), atol=1e-4)
    save_peft_adapter(model, tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("gpt_neo"), tmp_path / "adapter").eval()
    assert_close_verbose(logits(reloaded), after, 1e-5, 1e-4, "PEFT reload of the FILA adapter")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"fisher_mode": "diag"}, "fisher_mode must be one of"),
        ({"row_weighting": "random"}, "row_weighting must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"eps": -1.0}, "eps must be a finite number > 0"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        FilaConfig(**overrides)


def test_targets_matching_nothing_and_rank_too_large():
    with pytest.raises(ValueError, match="match no nn.Linear or Conv1D layer"):
        fila_init(tiny_model("gpt_neo"), FORGET, RETAIN, ["no_such_layer"])
    with pytest.raises(ValueError, match="rank"):
        fila_init(tiny_model("gpt_neo"), FORGET, RETAIN, "preset", rank=1000)
