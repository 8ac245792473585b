"""MA, EL_n and perplexity against straightforward references on tiny GPT-Neo / GPT-2 models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from fastunlearn.evals import metrics
from fastunlearn.losses import retain_loss, shift_causal
from tests.helpers.tiny_models import VOCAB, tiny_model

T = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def memorized():
    """A GPT-Neo (global + local attention) trained on 6 random sequences, and sets it knows to different degrees."""
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=T, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=64,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPTNeoForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, VOCAB, (6, T), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(80):
        loss = retain_loss(*shift_causal(model(train).logits, train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    partial = train[:3].clone()
    partial[0, 3] = (partial[0, 3] + 1) % VOCAB  # a wrong token
    partial[1, 12:] = torch.randint(0, VOCAB, (T - 12,), generator=gen)  # a known prefix, a new suffix
    partial[2, 5] = (partial[2, 5] + 7) % VOCAB
    sets = {"memorized": train, "partial": partial, "unseen": torch.randint(0, VOCAB, (3, T), generator=gen)}
    return model.eval(), sets


def _all(sets):
    return torch.cat(list(sets.values()))


def test_sets_cover_every_regime(memorized):
    """The equality tests below are only meaningful if the sets span memorized, partial and unseen."""
    model, sets = memorized
    ma = {name: metrics.memorization_accuracy(model, ids) for name, ids in sets.items()}
    el = {name: metrics.extraction_likelihood(model, ids, 10) for name, ids in sets.items()}
    assert (ma["memorized"] > 0.95).all() and (el["memorized"] == 1.0).sum() >= 4
    assert ((el["partial"] > 0) & (el["partial"] < 1)).all()
    assert (ma["unseen"] < 0.2).all() and (el["unseen"] == 0).all()


def test_memorization_accuracy_matches_per_position_loop(memorized):
    model, sets = memorized
    ids = _all(sets)
    with torch.no_grad():
        greedy = torch.stack([model(ids[:, :t]).logits[:, -1].argmax(-1) for t in range(1, T)], 1)  # (N, T-1)
    expected = (greedy == ids[:, 1:]).double().mean(1)
    assert torch.equal(metrics.memorization_accuracy(model, ids, batch_size=4), expected)


@pytest.mark.parametrize("side", ["right", "left"])
def test_memorization_accuracy_excludes_padding(memorized, side):
    model, sets = memorized
    ids = _all(sets)[:6]
    lengths = [T, 20, 7, 2, 15, 11]
    padded, mask = torch.full_like(ids, 5), torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        cols = slice(0, length) if side == "right" else slice(T - length, T)
        padded[i, cols], mask[i, cols] = ids[i, :length], 1
    expected = torch.cat(
        [metrics.memorization_accuracy(model, ids[i : i + 1, :length]) for i, length in enumerate(lengths)]
    )
    assert torch.equal(metrics.memorization_accuracy(model, padded, mask), expected)


@pytest.mark.parametrize("eos", [None, "in-sequence"])
@pytest.mark.parametrize("n", [10, 3, 1])
def test_fast_el_equals_generate_reference(memorized, n, eos):
    model, sets = memorized
    ids = _all(sets)
    eos_token_id = None if eos is None else int(sets["memorized"][0, 12])  # ends continuations mid-sequence
    reference = metrics.extraction_likelihood_reference(model, ids, n, eos_token_id=eos_token_id)
    fast = metrics.extraction_likelihood(model, ids, n, eos_token_id=eos_token_id, batch_size=5)
    assert torch.equal(fast, reference), (fast, reference)
    if eos is not None:  # the EOS convention changes some values, so it is exercised
        assert not torch.equal(fast, metrics.extraction_likelihood(model, ids, n))


def test_el_removes_right_padding(memorized):
    model, sets = memorized
    ids = _all(sets)[[0, 2, 6, 7, 9]]
    lengths = [T, 20, 17, 20, 12]
    padded, mask = torch.full_like(ids, 7), torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        padded[i, :length], mask[i, :length] = ids[i, :length], 1
    for fn in (metrics.extraction_likelihood, metrics.extraction_likelihood_reference):
        expected = torch.cat([fn(model, ids[i : i + 1, :length], 3) for i, length in enumerate(lengths)])
        assert torch.equal(fn(model, padded, 3, attention_mask=mask, batch_size=2), expected)
    assert not torch.equal(metrics.extraction_likelihood(model, padded, 3), expected)  # the padding would count


@pytest.mark.parametrize("kind", ["memorized", "gpt_neo", "gpt2"])
def test_continuations_equal_generate_per_prefix(memorized, kind):
    if kind == "memorized":
        model, sets = memorized
        ids = torch.cat([sets["partial"], sets["unseen"]])
    else:  # random weights; GPT-2's Conv1D layers and cache
        model, ids = tiny_model(kind), torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        table, _, row_of = metrics.extraction._greedy_continuations(model, ids, cache_mb=1024.0)
        for t in range(1, T):
            prompt = ids[:, :t]
            generated = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_length=T, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip
            assert torch.equal(table[row_of[:, t - 1]], generated), t
    assert len(table) > len(ids) + T  # prefixes were decoded, not only copied


def test_el_batching_and_cache_budget_do_not_change_values(memorized):
    model, sets = memorized
    ids = _all(sets)
    expected = metrics.extraction_likelihood(model, ids, 3)
    assert torch.equal(metrics.extraction_likelihood(model, ids, 3, batch_size=4, cache_mb=1e-6), expected)  # 1 row


def test_el_of_a_reproduced_sequence_is_one_and_n_equal_t_minus_one_scores_one_prefix(memorized):
    model, sets = memorized
    ids = sets["memorized"]
    ma = metrics.memorization_accuracy(model, ids)
    full = ids[ma == 1.0]
    assert len(full) >= 4
    assert (metrics.extraction_likelihood(model, full, T - 1) == 1.0).all()
    assert (metrics.extraction_likelihood(model, sets["unseen"], T - 1) == 0.0).all()


def _nll_by_hand(model, seq):
    with torch.no_grad():
        logits = model(seq[None]).logits[0, :-1]
    return F.cross_entropy(logits, seq[1:], reduction="sum").double().item()


def test_perplexity_is_exp_of_token_weighted_mean_nll():
    model = tiny_model("gpt_neo")
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (length,), generator=gen) for length in (5, 32, 13)]
    nll, count = metrics.sequence_nll(model, seqs, batch_size=2)
    assert count.tolist() == [4, 31, 12]
    expected = [_nll_by_hand(model, s) for s in seqs]
    torch.testing.assert_close(nll, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    ppl = metrics.perplexity(model, seqs)
    assert ppl == pytest.approx(math.exp(sum(expected) / 47), rel=1e-6)
    assert metrics.perplexity(model, torch.stack([seqs[1], seqs[1]])) == pytest.approx(math.exp(expected[1] / 31))


@pytest.mark.parametrize(("context", "stride"), [(16, 6), (16, 16), (32, None)])
def test_sliding_window_matches_the_hf_guide_loop(context, stride):
    model = tiny_model("gpt2")
    seq = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(3))
    nll, count = metrics.sequence_nll(model, [seq], context=context, stride=stride, batch_size=3)
    stride = stride or context // 2
    total, scored, prev_end = 0.0, 0, 0  # https://huggingface.co/docs/transformers/perplexity
    for begin in range(0, len(seq), stride):
        end = min(begin + context, len(seq))
        window = seq[None, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        n_scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(window, labels=labels).loss.double().item() * n_scored
        scored, prev_end = scored + n_scored, end
        if end == len(seq):
            break
    assert count.item() == scored
    if stride < context:
        assert scored == len(seq) - 1  # every token but the first, once
    assert nll.item() == pytest.approx(total, rel=1e-6)


def test_evaluate_returns_means_and_restores_training_mode(memorized):
    model, sets = memorized
    model.train()
    try:
        out = metrics.evaluate(model, sets, metrics=("ma", "el", "ppl"), n=3)
        assert model.training
    finally:
        model.eval()
    assert set(out) == set(sets) and all(set(row) == {"ma", "el", "ppl"} for row in out.values())
    unseen = sets["unseen"]
    assert out["unseen"]["ma"] == metrics.memorization_accuracy(model, unseen).mean().item()
    assert out["partial"]["el"] == metrics.extraction_likelihood(model, sets["partial"], 3).mean().item()
    assert out["unseen"]["ppl"] == metrics.perplexity(model, unseen)
    assert out["memorized"]["ppl"] < out["unseen"]["ppl"]


def test_bad_inputs_raise_naming_the_argument():
    model = tiny_model("gpt_neo")
    ids = torch.randint(0, VOCAB, (2, 12))
    with pytest.raises(ValueError, match=r"n=12 needs sequences of at least n \+ 1 = 13 tokens.*sequence 0 has 12"):
        metrics.extraction_likelihood(model, ids, 12)
    with pytest.raises(ValueError, match="n=12"):
        metrics.extraction_likelihood_reference(model, ids, 12)
    with pytest.raises(ValueError, match=r"n=3 needs .* sequence 1 has 3"):
        metrics.extraction_likelihood(model, ids, 3, attention_mask=torch.tensor([[1] * 12, [1] * 3 + [0] * 9]))
    with pytest.raises(ValueError, match=r"attention_mask must be right padding \(each row ones, then zeros\)"):
        metrics.extraction_likelihood(model, ids, 3, attention_mask=torch.tensor([[1] * 12, [0] + [1] * 11]))
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        metrics.extraction_likelihood(model, ids, 0)
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(0, 12\)\)"):
        metrics.extraction_likelihood(model, ids[:0], 3)
    with pytest.raises(ValueError, match=r"input_ids is empty"):
        metrics.memorization_accuracy(model, ids[:, :0])
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype torch.float32"):
        metrics.extraction_likelihood(model, ids.float(), 3)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor of token ids, got list"):
        metrics.memorization_accuracy(model, ids.tolist())
    with pytest.raises(ValueError, match=r"input_ids must have shape \(N, T\), got \(12,\)"):
        metrics.memorization_accuracy(model, ids[0])
    with pytest.raises(ValueError, match=r"outside \[0, 64\).*max 64"):
        metrics.memorization_accuracy(model, torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="T=40 tokens but the model's context is 32"):
        metrics.extraction_likelihood(model, torch.zeros(1, 40, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="eos_token_id must be an int token id or None, got 2.0"):
        metrics.extraction_likelihood_reference(model, ids, 3, eos_token_id=2.0)
    with pytest.raises(ValueError, match="cache_mb must be a finite number > 0, got 0"):
        metrics.extraction_likelihood(model, ids, 3, cache_mb=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        metrics.memorization_accuracy(model, ids, batch_size=0)
    with pytest.raises(ValueError, match="attention_mask leaves sequence 1 with fewer than 2 tokens"):
        metrics.memorization_accuracy(model, ids, torch.tensor([[1] * 12, [1] + [0] * 11]))
    with pytest.raises(ValueError, match=r"sequences\[1\] must be 1-D with at least 2 tokens, got shape \(1,\)"):
        metrics.perplexity(model, [ids[0], ids[0, :1]])
    with pytest.raises(ValueError, match="sequences is empty"):
        metrics.perplexity(model, [])
    with pytest.raises(ValueError, match=r"stride must be <= context \(8\), got 9"):
        metrics.perplexity(model, ids, context=8, stride=9)
    with pytest.raises(
        ValueError, match=r"metrics must be a non-empty sequence of \('ma', 'el', 'ppl'\), got \('em',\)"
    ):
        metrics.evaluate(model, {"forget": ids}, metrics=("em",))
