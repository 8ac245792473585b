"""Labels (question/answer sets) through the whole engine: MA / EL / perplexity on the answers, every forget term
and the retain term on answer tokens only (fused too), token-weighted accumulation, NPO's reference, FILA's
Fisher, fingerprints and resume, the held-out overlap check; unchanged values when a set has no labels.

The data: the tiny memorizer's rows read as question/answer pairs, the first few tokens of each row a prompt
(labels -100), one row right-padded. Values are compared with float64 references written from the definitions."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

from fastunlearn.data.labels import answer_start
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.inputs import data_fingerprint, fingerprint
from fastunlearn.engine.params import setup_params
from fastunlearn.engine.reference import sequence_logprobs
from fastunlearn.evals.metrics import (
    extraction_likelihood,
    extraction_likelihood_reference,
    memorization_accuracy,
    sequence_nll,
)
from fastunlearn.fused_lm import patch_fused_ihl
from fastunlearn.lora.fila import fila_init
from fastunlearn.losses import (
    forget_term,
    forget_units,
    npo_loss,
    retain_term,
    shift_causal,
    simnpo_loss,
)
from fastunlearn.ops.ihl import ihl_loss
from tests.helpers.runs import DEMO, FAST, NEVER, Interrupt, stop_at
from tests.helpers.tiny_models import tiny_model

PROMPTS = [3, 5, 4, 6, 2, 7, 3, 4]  # prompt tokens of each row (cycled)

pytestmark = pytest.mark.usefixtures("one_thread")


def qa_set(ids: torch.Tensor, pad_row: int | None = 1) -> SequenceSet:
    """``ids`` as question/answer rows: labels -100 on each row's first PROMPTS[i] tokens and on padding
    (``pad_row``: its last 2 tokens are padding)."""
    mask = torch.ones_like(ids)
    if pad_row is not None and pad_row < len(ids):
        mask[pad_row, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for i in range(len(ids)):
        labels[i, : PROMPTS[i % len(PROMPTS)]] = -100
    return SequenceSet(ids, mask, torch.arange(len(ids)), labels)


def plain(seqs: SequenceSet) -> SequenceSet:
    return SequenceSet(seqs.input_ids, seqs.attention_mask, seqs.source_index)


@pytest.fixture(scope="module")
def memorized(demo_memorizer, one_thread):
    """The memorizer's sets read as question/answer rows (in place of conftest's plain ones)."""
    model, sets = copy.deepcopy(demo_memorizer)
    data = UnlearningData(qa_set(sets["forget"]), qa_set(sets["retain"]), qa_set(sets["heldout"], None))
    return model, data


def run(memorized, out, data=None, model=None, **overrides):
    base, qa = memorized
    config = UnlearnConfig(**{**FAST, **overrides})
    return unlearn(copy.deepcopy(base) if model is None else model, qa if data is None else data, config, out)


def answer_targets(seqs: SequenceSet) -> torch.Tensor:
    """(N, T - 1) next-token targets written out: x_{t} where label_t != -100 and x_{t-1}, x_t are real tokens."""
    ids, mask, labels = seqs.input_ids, seqs.attention_mask, seqs.labels
    keep = (labels[:, 1:] != -100) & (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    return torch.where(keep, ids[:, 1:], -100)


# ---------------------------------------------------------------------------------------------------------
# Metrics on the answers
# ---------------------------------------------------------------------------------------------------------
def test_ma_counts_only_answer_positions(memorized):
    model = tiny_model("gpt_neo").double()  # untrained: its greedy tokens hit some targets, not all
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))
    seqs = qa_set(ids)
    got = memorization_accuracy(model, ids, seqs.attention_mask, labels=seqs.labels, batch_size=4)
    with torch.no_grad():
        greedy = model(ids, attention_mask=seqs.attention_mask).logits[:, :-1].argmax(-1)
    targets = answer_targets(seqs)
    expected = [
        sum(int(greedy[i, t] == targets[i, t]) for t in range(11) if targets[i, t] >= 0)
        / sum(1 for t in range(11) if targets[i, t] >= 0)
        for i in range(6)
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    unlabelled = memorization_accuracy(model, ids, seqs.attention_mask, batch_size=4)
    assert not torch.allclose(got, unlabelled)  # the prompt positions really are left out
    with pytest.raises(ValueError, match=r"sequence 0 has no labelled next-token target"):
        memorization_accuracy(model, ids, labels=torch.full_like(ids, -100))


def el_by_definition(model, x: torch.Tensor, n: int, start: int) -> float:
    """EL_n of one unpadded row from the definition: every prefix prompt + answer[:k] (t = max(start, 1)..T-n)
    continued greedily token by token (a full forward each), its n-grams counted in the suffix's set."""
    T, a, total = len(x), max(start, 1), 0.0
    for t in range(a, T - n + 1):
        seq = x[:t].clone()
        with torch.no_grad():
            while len(seq) < T:
                seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
        pred, label = seq[t:].tolist(), x[t:].tolist()
        label_set = {tuple(label[s : s + n]) for s in range(len(label) - n + 1)}
        hits = sum(tuple(pred[s : s + n]) in label_set for s in range(len(pred) - n + 1))
        total += hits / (len(label) - n + 1)
    return total / (T - n - a + 1)


def test_el_over_the_answer_equals_the_definition_fast_and_reference(memorized):
    model = copy.deepcopy(memorized[0]).double()
    forget = memorized[1].forget
    # memorized rows (few deviations), and three with one answer token changed (the greedy continuations leave
    # the row there and may come back); one row padded, prompts of 3 to 6 tokens
    changed = forget.input_ids[:3].clone()
    changed[:, 9] = (changed[:, 9] + 1) % DEMO.vocab_size
    edited = qa_set(changed, None)
    seqs = SequenceSet(
        torch.cat([forget.input_ids, changed]), torch.cat([forget.attention_mask, edited.attention_mask]),
        torch.arange(7), torch.cat([forget.labels, edited.labels]),
    )  # fmt: skip
    starts = answer_start(seqs.labels)
    assert starts.tolist() == [3, 5, 4, 6, 3, 5, 4]
    n = 3
    fast = extraction_likelihood(model, seqs.input_ids, n, attention_mask=seqs.attention_mask, answer_start=starts,
                                 batch_size=3)  # fmt: skip
    reference = extraction_likelihood_reference(
        model, seqs.input_ids, n, attention_mask=seqs.attention_mask, answer_start=starts, batch_size=3
    )
    lengths = seqs.attention_mask.sum(1)
    expected = [el_by_definition(model, seqs.input_ids[i, : lengths[i]], n, int(starts[i])) for i in range(7)]
    assert fast.tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(fast, reference)  # the same float operations in the same order
    assert 0 < fast[4:].min() and fast[4:].max() < 1  # edited rows: partly extracted, so the test can fail
    # no labels: plain EL_n, bit for bit the same as an answer starting at position 0 or 1
    whole = extraction_likelihood(model, seqs.input_ids, n, attention_mask=seqs.attention_mask)
    for start in (0, 1):
        ones = torch.full((7,), start)
        assert torch.equal(whole, extraction_likelihood(model, seqs.input_ids, n, attention_mask=seqs.attention_mask,
                                                        answer_start=ones))  # fmt: skip
    assert not torch.allclose(whole, fast)
    with pytest.raises(ValueError, match=r"answers of at least n = 5 tokens.*sequence 0 has 4"):
        extraction_likelihood(model, seqs.input_ids[:1, :7], 5, answer_start=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"EL_5 \(el_n=5\) needs answers of at least 5"):
        SequenceSet(seqs.input_ids[:, :9], seqs.attention_mask[:, :9], seqs.source_index,
                    seqs.labels[:, :9]).check_el_length("forget set", 5)  # fmt: skip


def test_answer_perplexity_counts_only_labelled_tokens(memorized):
    model = tiny_model("gpt_neo").double()
    seqs = qa_set(torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(4)))
    lengths = seqs.attention_mask.sum(1).tolist()
    rows = [seqs.input_ids[i, :n] for i, n in enumerate(lengths)]
    labels = [seqs.labels[i, :n] for i, n in enumerate(lengths)]
    nll, count = sequence_nll(model, rows, labels=labels, batch_size=2)
    targets = answer_targets(seqs)
    with torch.no_grad():
        logits = model(seqs.input_ids, attention_mask=seqs.attention_mask).logits[:, :-1]
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)
    assert nll.tolist() == pytest.approx(expected.tolist(), rel=1e-6)  # sequence_nll takes float32 logits
    assert count.tolist() == (targets != -100).sum(1).tolist()
    same = sequence_nll(model, rows, labels=rows, batch_size=2)  # labels equal to the ids: plain perplexity
    assert torch.equal(same[0], sequence_nll(model, rows, batch_size=2)[0])


# ---------------------------------------------------------------------------------------------------------
# The loss terms and their counts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_every_term_covers_answer_tokens_only(memorized, fused):
    model = tiny_model("gpt_neo")  # float32 (IHL's dtypes); the references are float64 from its logits
    seqs = qa_set(torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5)))
    batch = seqs.batch()
    targets = answer_targets(seqs)
    with torch.no_grad():
        logits = model(seqs.input_ids, attention_mask=seqs.attention_mask).logits[:, :-1].double()
    valid = targets >= 0
    y = targets.clamp(min=0)
    token_logp = torch.where(valid, logits.log_softmax(-1).gather(-1, y[..., None])[..., 0], 0.0)
    p = logits.softmax(-1)
    p_y = p.gather(-1, y[..., None])[..., 0]
    runner_up = p.scatter(-1, y[..., None], -1.0).max(-1).values
    ihl = torch.where(valid, (1 + p_y - runner_up).clamp(min=0), 0.0)  # the definition, margin 1
    logp, lengths = token_logp.sum(1), valid.sum(1)
    reference = torch.tensor([-3.0, -5.0, -4.0, -6.0], dtype=torch.float64)
    expected = {
        "ihl": ihl.sum(),
        "ga": token_logp.sum(),
        "simnpo": simnpo_loss(logp, lengths, reduction="sum"),
        "npo": npo_loss(logp, reference, lengths=lengths, reduction="sum"),
        "retain": -token_logp.sum(),
    }
    if fused:
        patch_fused_ihl(model)
    for name, value in expected.items():
        term = retain_term(fused=fused) if name == "retain" else forget_term(name, fused=fused)
        got = term(model, {**batch, "reference": reference})
        assert got.item() == pytest.approx(value.item(), rel=1e-5), name
        unlabelled = term(model, {**plain(seqs).batch(), "reference": reference})
        assert unlabelled.item() != pytest.approx(value.item(), rel=1e-3), name  # the labels change the value
    assert int(forget_units("ihl", **batch)) == int((targets >= 0).sum())
    no_answer = seqs.labels.clone()
    no_answer[2] = -100
    assert int(forget_units("npo", seqs.input_ids, seqs.attention_mask, no_answer)) == 3


def test_npo_reference_is_the_answer_log_likelihood(memorized):
    model = tiny_model("gpt_neo")
    seqs = qa_set(torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(6)))
    targets = answer_targets(seqs)
    with torch.no_grad():
        logits = model(seqs.input_ids, attention_mask=seqs.attention_mask).logits[:, :-1].double()
    expected = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)
    assert sequence_logprobs(model, seqs, batch_size=2).tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    patch_fused_ihl(model)
    fused = sequence_logprobs(model, seqs, batch_size=2, fused=True)
    assert fused.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def test_accumulated_answer_gradient_does_not_depend_on_micro_batch_size(memorized, tmp_path):
    base, data = memorized
    first = {}
    for loss, weight, sizes in (("ihl", 0.0, (1, 3, 4)), ("ihl", 1.0, (1, 4)), ("npo", 1.0, (1, 4))):
        for size in sizes:  # sizes 1 and 4 pair the same 4 retain sequences
            result = run(memorized, tmp_path / f"{loss}-{weight}-mb{size}", params="lora", forget_loss=loss,
                         retain_weight=weight, micro_batch_size=size, max_epochs=1, **NEVER)  # fmt: skip
            first[loss, weight, size] = result.log["tasks"][0]["epochs"][0]
    f = data.forget
    full_batch = ihl_loss(*shift_causal(base(f.input_ids, attention_mask=f.attention_mask).logits, **f.batch()))
    whole_rows = ihl_loss(*shift_causal(base(f.input_ids, attention_mask=f.attention_mask).logits,
                                        f.input_ids, f.attention_mask))  # fmt: skip
    assert full_batch.item() != pytest.approx(whole_rows.item(), rel=1e-3)
    for (loss, weight, _size), epoch in first.items():
        if loss == "ihl":
            assert epoch["forget_loss"] == pytest.approx(full_batch.item(), rel=1e-5)
        for key in ("forget_loss", "retain_loss", "grad_norm"):
            if epoch[key] is not None:
                assert epoch[key] == pytest.approx(first[loss, weight, 1][key], rel=1e-5), (loss, key)
    # the baseline is measured on the answers
    result_log = run(memorized, tmp_path / "baseline", params="lora", max_epochs=1, **NEVER).log
    ma = memorization_accuracy(base, f.input_ids, f.attention_mask, labels=f.labels).mean().item()
    el = extraction_likelihood(
        base, f.input_ids, 5, attention_mask=f.attention_mask, answer_start=answer_start(f.labels)
    )
    assert result_log["baseline"]["forget"][0] == pytest.approx({"ma": ma, "el": el.mean().item()}, abs=1e-12)


def test_fused_qa_run_equals_the_unfused_one(memorized, tmp_path):
    logs = [run(memorized, tmp_path / f"fused{fused}", params="lora", fused_ihl=fused, max_epochs=2, **NEVER).log
            for fused in (False, True)]  # fmt: skip
    for a, b in zip(*(log["tasks"][0]["epochs"] for log in logs), strict=True):
        for key in ("forget_loss", "retain_loss", "grad_norm", "forget_ma"):
            assert a[key] == pytest.approx(b[key], rel=1e-5 if a["epoch"] == 1 else 1e-3), (key, a["epoch"])


def test_fila_fisher_covers_answer_tokens_only(memorized):
    base, data = memorized
    cfg = UnlearnConfig(**FAST, params="fila")
    model = copy.deepcopy(base)
    setup_params(model, cfg, data.forget, data.retain, None)
    direct, unlabelled = copy.deepcopy(base), copy.deepcopy(base)
    fila_init(direct, data.forget.batch(), data.retain.batch(), cfg.targets, cfg.fila_config())
    fila_init(unlabelled, plain(data.forget).batch(), plain(data.retain).batch(), cfg.targets, cfg.fila_config())
    names = [k for k in model.state_dict() if "lora_A" in k or "lora_a" in k]
    assert names
    for name in names:
        torch.testing.assert_close(model.state_dict()[name], direct.state_dict()[name], rtol=0, atol=0)
    assert any(not torch.allclose(model.state_dict()[k], unlabelled.state_dict()[k]) for k in names)


def test_resumed_qa_run_equals_the_uninterrupted_one_and_refuses_other_labels(memorized, tmp_path):
    base, data = memorized
    config = UnlearnConfig(**FAST, params="fila", forget_loss="npo", max_epochs=3, **NEVER)
    expected = unlearn(copy.deepcopy(base), data, config, tmp_path / "one")

    out = tmp_path / "two"
    with pytest.raises(Interrupt):
        unlearn(copy.deepcopy(base), data, config, out, on_epoch_end=stop_at(2))
    other = copy.deepcopy(data)
    other.forget.labels[0, 3] = -100  # one answer token fewer
    with pytest.raises(ValueError, match=r"different data"):
        unlearn(copy.deepcopy(base), other, config, out)
    resumed = unlearn(copy.deepcopy(base), data, config, out)
    for a, b in zip(expected.log["tasks"][0]["epochs"], resumed.log["tasks"][0]["epochs"], strict=True):
        for key in ("forget_loss", "retain_loss", "grad_norm", "forget_ma", "forget_el"):
            assert a[key] is b[key] is None or a[key] == pytest.approx(b[key], rel=1e-6), key  # EL: None alike
    for name, value in expected.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_fingerprint_holds_labels_and_is_unchanged_without_them(memorized):
    data = memorized[1]
    seqs = plain(data.forget)
    old = hashlib.sha256()  # the formula before labels existed
    for t in (seqs.input_ids, seqs.attention_mask):
        old.update(repr(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
    assert fingerprint([seqs]) == old.hexdigest()
    assert fingerprint([data.forget]) != fingerprint([seqs])
    other = copy.deepcopy(data.forget)
    other.labels[1, 6] = -100
    assert data_fingerprint([other], None, None) != data_fingerprint([data.forget], None, None)


def test_heldout_overlap_is_judged_on_the_answers(memorized, tmp_path):
    base, data = memorized
    forget = data.forget
    # held-out rows with the forget set's answers behind other prompts: the answers are memorized text
    ids = forget.input_ids.clone()
    ids[:, :3] = data.heldout.input_ids[:4, :3]  # other questions (prompts of 3 to 6 tokens: 3 always differ)
    assert not (ids[:, :3] == forget.input_ids[:, :3]).all(1).any()
    copied = SequenceSet(ids, forget.attention_mask, torch.arange(4), forget.labels)
    with pytest.raises(ValueError, match=r"overlaps the forget set: 4 of 4 held-out rows are in it \(0 identical"):
        run(memorized, tmp_path / "refused", UnlearningData(forget, data.retain, copied), params="lora")
    # the forget set's first prompt tokens with other answers: accepted, and the run measures it
    ids = data.heldout.input_ids[:4].clone()
    ids[:, :3] = forget.input_ids[:, :3]
    fresh = SequenceSet(ids, torch.ones_like(ids), torch.arange(4), ids.masked_fill(torch.arange(16) < 6, -100))
    result = run(memorized, tmp_path / "ok", UnlearningData(forget, data.retain, fresh), params="lora", max_epochs=1,
                 **NEVER)  # fmt: skip
    assert result.log["data"]["heldout"] == 4


def test_labels_outside_the_vocabulary_are_refused_before_any_compute(memorized, tmp_path):
    base, data = memorized
    bad = copy.deepcopy(data)
    bad.retain.labels[2, 9] = DEMO.vocab_size  # no such token
    with pytest.raises(ValueError, match=r"retain set labels has token id 32"):
        run(memorized, tmp_path / "bad", bad, params="lora")
