"""Empirical Fisher: both modes against one-backward-per-sequence references, the Triton path against the torch
path end to end, padding and ignored labels, Conv1D layout, the model's state afterwards, and input errors (the
accumulation op itself: tests/ops/test_fisher_accumulate.py)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastunlearn.lora import fisher
from fastunlearn.lora.fisher import FisherResult, empirical_fisher, relative_fisher
from fastunlearn.lora.targets import find_targets
from tests.helpers.backends import interpreter
from tests.helpers.reference import assert_close_verbose

VOCAB, T = 50, 12
RTOL = 2e-6  # the result is float32: a few roundings of 2^-24 relative


def gpt_neo(dtype=torch.float64) -> nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    # dropout > 0: the estimate matches the references only if eval mode is enforced
    config = GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=32,
        embed_dropout=0.1, attention_dropout=0.1, resid_dropout=0.1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPTNeoForCausalLM(config).to(dtype)


def gpt2(dtype=torch.float64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype)


MODELS = {"gpt_neo": gpt_neo, "gpt2": gpt2}


def padded_batch(n: int = 5):
    """Right-padded ids with attention_mask, and labels with an ignored prompt (HF-aligned with ids)."""
    ids = torch.randint(1, VOCAB, (n, T))
    lengths = torch.tensor([T, 8, 5, T, 2][:n])
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return ids, mask, labels, lengths


def naive_per_example(model, ids, lengths=None, labels=None, targets="preset"):
    """(1/N) sum_n (dL_n/dW)^2: one backward per unpadded sequence, parameter .grad squared."""
    model.eval()
    modules = find_targets(model, targets)
    out = {name: torch.zeros_like(m.weight) for name, m in modules.items()}
    for n in range(len(ids)):
        length = T if lengths is None else int(lengths[n])
        seq = ids[n : n + 1, :length]
        target = (seq if labels is None else labels[n : n + 1, :length])[0, 1:]
        model.zero_grad()
        F.cross_entropy(model(seq).logits[0, :-1], target, ignore_index=-100, reduction="sum").backward()
        for name, m in modules.items():
            out[name] += m.weight.grad**2 / len(ids)
    model.zero_grad(set_to_none=True)
    return out


def assert_fisher_close(got: dict, expected: dict, rtol: float = RTOL, what: str = "fisher"):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.promote_types(value.dtype, torch.float32), name  # float64 model: float64
        assert got[name].shape == value.shape, name
        assert value.abs().max() > 0, f"{name}: the reference is all zeros, the test would prove nothing"
        assert_close_verbose(got[name], value, rtol * value.abs().max().item(), rtol, f"{what} {name}")


@pytest.mark.parametrize("arch", list(MODELS))
def test_per_example_matches_one_backward_per_sequence(arch, force_impl):
    model = MODELS[arch]()
    ids = torch.randint(0, VOCAB, (5, T))
    with force_impl("torch"):
        result = empirical_fisher(model, ids, "preset", batch_size=2, progress=False)  # batches of 2, 2, 1
    assert (result.n_examples, result.n_tokens, result.mode) == (5, 5 * (T - 1), "per_example")
    assert_fisher_close(result.fisher, naive_per_example(model, ids))


def test_per_batch_is_squared_batch_gradient_times_tokens():
    model = gpt_neo()
    ids, mask, labels, _ = padded_batch()
    result = empirical_fisher(
        model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, ["c_fc", "v_proj"],
        mode="per_batch", batch_size=3, progress=False,
    )  # fmt: skip
    model.eval()
    modules = find_targets(model, ["c_fc", "v_proj"])
    expected = {name: torch.zeros_like(m.weight) for name, m in modules.items()}
    n_tokens = 0
    for rows in (slice(0, 3), slice(3, 5)):
        targets = labels[rows, 1:].masked_fill(mask[rows, :-1] == 0, -100)
        n_batch = int((targets != -100).sum())
        logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits[:, :-1]
        model.zero_grad()
        F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100).backward()  # mean
        for name, m in modules.items():
            expected[name] += m.weight.grad**2 * n_batch
        n_tokens += n_batch
    assert (result.n_examples, result.n_tokens, result.mode) == (5, n_tokens, "per_batch")
    assert_fisher_close(result.fisher, expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_padding_and_ignored_labels_equal_the_unpadded_sequences(arch, force_impl):
    """Right padding + labels -100 on a prompt: the same as each sequence alone without padding (GPT-2's
    Conv1D also checks the (in, out) layout)."""
    model = MODELS[arch]()
    ids, mask, labels, lengths = padded_batch()
    with force_impl("torch"):
        result = empirical_fisher(
            model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, "preset", batch_size=5, progress=False
        )
    assert result.n_tokens == int((labels[:, 1:] != -100).sum())
    assert_fisher_close(result.fisher, naive_per_example(model, ids, lengths, labels))
    if arch == "gpt2":
        assert result.fisher["transformer.h.0.mlp.c_fc"].shape == (16, 64)  # Conv1D weight: (in, out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_positions_get_exactly_zero_output_gradient(side):
    """The accumulation relies on G = 0 at padding (X there is arbitrary): check it on the hooked outputs."""
    model = gpt_neo().eval()
    ids, mask, _, _ = padded_batch()
    if side == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    modules = find_targets(model, "preset")
    grads = {}
    taps = fisher._Taps(modules, lambda name, x, g: grads.__setitem__(name, g))
    try:
        loss, _ = fisher._sequence_nll(model, {"input_ids": ids, "attention_mask": mask}, -100)
        taps.backward(loss, modules)
    finally:
        taps.remove()
    assert grads.keys() == modules.keys()
    for name, g in grads.items():
        assert g[mask == 0].abs().max() == 0, name
        assert g[mask == 1].abs().max() > 0, name


def test_model_state_is_unchanged_and_frozen_models_work():
    model = gpt2()
    model.train()
    model.transformer.h[1].eval()  # mixed modes must come back as they were
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, VOCAB, (3, T))
    with torch.no_grad():  # a caller's no_grad does not stop the estimate
        result = empirical_fisher(model, ids, "preset", progress=False)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not any(m._forward_hooks for m in model.modules())
    model.requires_grad_(False)  # fully frozen: same result
    frozen = empirical_fisher(model, ids, "preset", progress=False)
    assert_fisher_close(frozen.fisher, result.fisher, rtol=0.0)
    assert_fisher_close(result.fisher, naive_per_example(model.requires_grad_(True), ids))


def test_data_forms_and_max_examples_agree():
    model = gpt_neo()
    ids = torch.randint(0, VOCAB, (6, T))
    reference = empirical_fisher(model, ids[:5], "c_proj", batch_size=5, progress=False)
    batches = [{"input_ids": ids[:2]}, ids[2:4], {"input_ids": ids[4:], "attention_mask": torch.ones_like(ids[4:])}]
    for data in (ids, {"input_ids": ids}, batches, iter(batches)):
        got = empirical_fisher(model, data, "c_proj", batch_size=2, max_examples=5, progress=False)
        assert (got.n_examples, got.n_tokens) == (5, 5 * (T - 1))
        assert_fisher_close(got.fisher, reference.fisher, rtol=1e-6)


@interpreter
def test_triton_path_end_to_end_in_bf16_and_under_autocast(force_impl):
    """bf16 model: the kernel equals the torch path on the same X and G (up to fp32 summation order).
    Autocast gives float32 inputs with bf16 output gradients, which the host promotes."""
    model = gpt2(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (3, T))
    results = {}
    for impl in ("torch", "triton"):
        with force_impl(impl):
            results[impl] = empirical_fisher(model, ids, "mlp.c_fc", progress=False)
    assert_fisher_close(results["triton"].fisher, results["torch"].fisher, rtol=1e-4, what="bf16")
    model = model.float()
    with force_impl("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = empirical_fisher(model, ids, "mlp.c_fc", progress=False)
    full = empirical_fisher(model, ids, "mlp.c_fc", progress=False)
    assert_fisher_close(mixed.fisher, full.fisher, rtol=0.1, what="autocast")  # bf16 forward vs fp32


def test_float64_models_cannot_be_forced_onto_the_kernel(force_impl):
    with force_impl("triton"), pytest.raises(RuntimeError, match="no 'triton' path"):
        empirical_fisher(gpt_neo(), torch.randint(0, VOCAB, (2, T)), "c_fc", progress=False)


def test_relative_fisher_normalizations():
    a, b = torch.tensor([[4.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    per_batch = relative_fisher(FisherResult({"w": a}, 2, 4, "per_batch"), FisherResult({"w": b}, 3, 10, "per_batch"))
    assert_close_verbose(per_batch["w"], (a / 4) / (1e-5 + b / 10), 0.0, 1e-6, "per_batch")
    per_example = relative_fisher(
        FisherResult({"w": a}, 2, 4, "per_example"), FisherResult({"w": b}, 3, 10, "per_example"), eps=0.5
    )
    assert_close_verbose(per_example["w"], a / (0.5 + b), 0.0, 1e-6, "per_example")
    with pytest.raises(ValueError, match="share a mode"):
        relative_fisher(FisherResult({"w": a}, 2, 4, "per_batch"), FisherResult({"w": b}, 3, 10, "per_example"))
    with pytest.raises(ValueError, match=r"only in forget \['w'\], only in retain \['v'\]"):
        relative_fisher(FisherResult({"w": a}, 2, 4, "per_batch"), FisherResult({"v": b}, 3, 10, "per_batch"))
    with pytest.raises(ValueError, match="eps must be"):
        relative_fisher(FisherResult({"w": a}, 2, 4, "per_batch"), FisherResult({"w": b}, 3, 10, "per_batch"), -1)


class _Reused(nn.Module):
    """A toy causal LM that applies its layer ``proj`` twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.head(self.proj(self.proj(self.embed(input_ids)))))


def fit(model, data, targets="c_fc", **kwargs):
    return empirical_fisher(model, data, targets, progress=False, **kwargs)


BAD_CALLS = {
    "no-target": (lambda m, ids: fit(m, ids, "no_such_layer"), ValueError, "match no nn.Linear"),
    "empty": (lambda m, ids: fit(m, ids[:0]), ValueError, "holds no sequences"),
    "empty-iterable": (lambda m, ids: fit(m, []), ValueError, "holds no sequences"),
    "short": (lambda m, ids: fit(m, ids[:, :1]), ValueError, r"1 token\(s\)"),
    "mode": (lambda m, ids: fit(m, ids, mode="fisher"), ValueError, "mode must be one of"),
    "batch-size": (lambda m, ids: fit(m, ids, batch_size=0), ValueError, "batch_size must be"),
    "max-examples": (lambda m, ids: fit(m, ids, max_examples=0), ValueError, "max_examples must be"),
    "float-ids": (lambda m, ids: fit(m, ids.float()), TypeError, r"input_ids'\] must be an integer"),
    "no-input-ids": (lambda m, ids: fit(m, {"ids": ids}), TypeError, "dict with 'input_ids'"),
    "not-data": (lambda m, ids: fit(m, 3), TypeError, "data must be"),
    "short-batch": (lambda m, ids: fit(m, [ids, ids[:, :1]]), ValueError, r"data\[1\]\['input_ids'\]"),
    "labels-shape": (
        lambda m, ids: fit(m, {"input_ids": ids, "labels": ids[:, 1:]}),
        ValueError,
        r"has shape \(2, 11\)",
    ),
    "all-ignored": (
        lambda m, ids: fit(m, {"input_ids": ids, "labels": torch.full_like(ids, -100)}),
        ValueError,
        "to score",
    ),
    "layer-reused": (lambda m, ids: fit(_Reused(), ids, "proj"), RuntimeError, "'proj' ran twice"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_give_clear_errors(case):
    call, error, match = BAD_CALLS[case]
    model = gpt_neo()
    with pytest.raises(error, match=match):
        call(model, torch.randint(0, VOCAB, (2, T)))
    assert not any(m._forward_hooks for m in model.modules())


def test_sequence_nll_keeps_a_float64_model_in_float64():
    """The loss whose gradient the Fisher squares is computed in the model's dtype (it was always float32)."""
    model = gpt_neo(torch.float64).eval()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    loss, count = fisher._sequence_nll(model, {"input_ids": ids}, -100)
    logits = model(input_ids=ids).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    assert loss.dtype == torch.float64 and count == 2 * (T - 1)
    assert abs(loss.item() - expected.item()) <= 1e-12 * expected.item()
