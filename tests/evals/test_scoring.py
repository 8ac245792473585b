"""score_sequences: MA and NLL from one forward per batch. The fused path (last hidden states -> log p + argmax,
never the (B, T, V) logits) against the through-logits path on tiny models (tied embeddings, a head bias,
padding on either side, question/answer labels): greedy hits equal as counts, NLL to 1e-6 relative; the public
MA and perplexity unchanged; models the fused path cannot reproduce fall back to the logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastunlearn.evals import metrics
from fastunlearn.evals.metrics import SequenceScores, score_sequences
from fastunlearn.evals.metrics.scoring import fused_unsupported
from tests.helpers.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
T = 16


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def with_head_bias(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.out_features, generator=torch.Generator().manual_seed(4)))
    return model


MODELS = {
    "gpt_neo": lambda: tiny_model("gpt_neo"),  # tied embeddings, local attention
    "gpt2": lambda: with_head_bias(tiny_model("gpt2")),  # tied weight plus a bias on the output layer
    "llama": tiny_llama,  # an untied head, rotary positions
}


def half_greedy(model: torch.nn.Module) -> torch.Tensor:
    """(6, T) ids: 3 greedy continuations of a 2-token prompt by the model itself (every token after the prompt
    is a greedy hit under teacher forcing: T - 2 hits), one of them with a wrong token, and 3 random sequences."""
    gen = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, VOCAB, (3, 2), generator=gen)
    with torch.no_grad():
        greedy = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=T - 2,
                                do_sample=False, pad_token_id=0)  # fmt: skip
    greedy[1, 7] = (greedy[1, 7] + 1) % VOCAB
    return torch.cat([greedy, torch.randint(0, VOCAB, (3, T), generator=gen)])


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_ids(request):
    model = MODELS[request.param]()
    return model, half_greedy(model)


def assert_same_scores(fused: SequenceScores, logits: SequenceScores) -> None:
    assert torch.equal(fused.tokens, logits.tokens)
    assert torch.equal(fused.correct, logits.correct), (fused.correct, logits.correct)
    assert fused.nll.dtype == torch.float64
    torch.testing.assert_close(fused.nll, logits.nll, rtol=1e-6, atol=1e-9)


def test_fused_and_logits_paths_agree(model_and_ids):
    model, ids = model_and_ids
    assert fused_unsupported(model) is None
    fused = score_sequences(model, ids, batch_size=4, fused=True)
    logits = score_sequences(model, ids, batch_size=4, fused=False)
    assert_same_scores(fused, logits)
    assert fused.tokens.tolist() == [T - 1] * 6
    assert fused.correct[[0, 2]].tolist() == [T - 2] * 2 and fused.correct[1] < T - 2  # the greedy rows
    # the reference straight from the logits, one sequence at a time
    with torch.no_grad():
        z = model(ids).logits[:, :-1].double()
    nll = -torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    torch.testing.assert_close(fused.nll, nll, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.correct, (z.argmax(-1) == ids[:, 1:]).sum(1))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_labels_on_both_paths(model_and_ids, side):
    model, ids = model_and_ids
    mask = torch.ones_like(ids)
    lengths = torch.tensor([T, T - 3, T - 6, T, T - 1, 5])
    for i, n in enumerate(lengths.tolist()):
        if side == "right":
            mask[i, n:] = 0
        else:
            mask[i, : T - n] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 9] = -7  # any negative label is ignored
    for kwargs in ({}, {"labels": labels}):
        fused = score_sequences(model, ids, mask, batch_size=4, fused=True, **kwargs)
        logits = score_sequences(model, ids, mask, batch_size=4, fused=False, **kwargs)
        assert_same_scores(fused, logits)
    assert fused.tokens.tolist() == [
        int(((labels[i, 1:] >= 0) & mask[i, 1:].bool() & mask[i, :-1].bool()).sum()) for i in range(6)
    ]


def test_public_metrics_equal_through_the_logits(model_and_ids):
    """MA bit-equal, perplexity (sliding windows included) to 1e-6 relative; ``evaluate`` with both metrics
    (one scoring pass) equal to the separate calls."""
    model, ids = model_and_ids
    mask = torch.ones_like(ids)
    mask[3, :5] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        fused = metrics.memorization_accuracy(model, ids, batch_size=4, **kwargs)
        assert torch.equal(fused, metrics.memorization_accuracy(model, ids, batch_size=4, fused=False, **kwargs))
    assert fused[[0, 2]].tolist() == [(T - 2) / (T - 1)] * 2
    for context, stride in ((None, None), (8, 3)):
        got = metrics.perplexity(model, ids, context=context, stride=stride, batch_size=3)
        want = metrics.perplexity(model, ids, context=context, stride=stride, batch_size=3, fused=False)
        assert got == pytest.approx(want, rel=1e-6)
    both = metrics.evaluate(model, {"set": ids}, metrics=("ma", "ppl"), batch_size=4)["set"]
    assert both["ma"] == metrics.memorization_accuracy(model, ids, batch_size=4).mean().item()
    assert both["ppl"] == metrics.perplexity(model, ids, batch_size=4)


def test_fused_path_never_calls_the_output_layer_or_holds_the_logits(monkeypatch):
    import fastunlearn.ops.reference.logprob as backend
    from fastunlearn.ops import dispatch

    model = tiny_model("gpt_neo")
    ids = half_greedy(model)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append("head"))
    seen = []
    original = backend.logprob_argmax_forward
    monkeypatch.setattr(backend, "logprob_argmax_forward",
                        lambda z, y, i: seen.append(tuple(z.shape)) or original(z, y, i))  # fmt: skip
    with dispatch._force_impl("torch"):
        score_sequences(model, ids, batch_size=4, chunk_rows=7)
    assert calls == [] and seen and all(rows <= 7 and v == VOCAB for rows, v in seen)
    assert sum(rows for rows, _ in seen) == 6 * (T - 1)
    score_sequences(model, ids, batch_size=4, fused=False)
    assert calls == ["head", "head"]


def test_models_the_fused_path_cannot_reproduce_go_through_the_logits():
    model = tiny_model("gpt_neo")
    ids = half_greedy(model)
    model.config.final_logit_softcapping = 30.0  # the fused path cannot apply a softcap: it refuses the model
    assert "final_logit_softcapping" in fused_unsupported(model)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append("head"))
    auto = score_sequences(model, ids, batch_size=6)
    assert calls == ["head"]
    assert_same_scores(auto, score_sequences(model, ids, batch_size=6, fused=False))
    with pytest.raises(ValueError, match="fused=True but .*config.final_logit_softcapping"):
        score_sequences(model, ids, fused=True)
    assert "no backbone separate from itself" in fused_unsupported(torch.nn.Sequential(model))  # a wrapper
    assert "torch.float64" in fused_unsupported(tiny_model("gpt2").double())


def test_scores_give_ma_and_perplexity_and_bad_input_is_refused():
    model = tiny_model("gpt2")
    ids = half_greedy(model)
    scores = score_sequences(model, ids, batch_size=5)
    assert torch.equal(scores.ma(), scores.correct.double() / scores.tokens)
    assert scores.perplexity() == pytest.approx(math.exp(scores.nll.sum().item() / scores.tokens.sum().item()))
    with pytest.raises(ValueError, match="fused must be True, False or None, got 'yes'"):
        score_sequences(model, ids, fused="yes")
    with pytest.raises(ValueError, match="batch_size"):
        score_sequences(model, ids, batch_size=0)
    with pytest.raises(ValueError, match=r"labels has shape \(6, 3\) but input_ids has \(6, 16\)"):
        score_sequences(model, ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="input_ids has token id 126, outside"):
        score_sequences(model, ids + VOCAB)
