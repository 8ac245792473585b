"""The membership scores against float64 references: the vocabulary statistics of Min-K%++ (chunked, batched,
padded, over 65536 tokens, extreme logits), Min-K% / Min-K%++ / zlib by hand, the AUC with ties, PrivLeak."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch

from fastunlearn.data.text import SequenceSet
from fastunlearn.evals.audit import membership as mia
from tests.helpers.tiny_models import VOCAB, tiny_model


def reference_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64, straight from the definitions: p = softmax, mu = E_p[log p], sigma^2 = E_p[(log p - mu)^2]."""
    x = logits.double()
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()  # the other form of the variance
    return logp, mu, var.clamp(min=0).sqrt()


@pytest.mark.parametrize("shape", [(5, 7), (3, 70_000)], ids=["V7", "V70000"])
def test_vocab_stats_match_float64(shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4
    logp, mu, sigma = mia.vocab_stats(logits)
    ref_logp, ref_mu, ref_sigma = reference_stats(logits)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mu.double(), ref_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma.double(), ref_sigma, rtol=1e-4, atol=1e-5)
    logp64, mu64, sigma64 = mia.vocab_stats(logits.double())  # float64 logits: float64 throughout
    assert mu64.dtype == torch.float64
    torch.testing.assert_close(mu64, ref_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma64, ref_sigma, rtol=1e-9, atol=1e-12)


def test_vocab_stats_extreme_logits_and_the_sigma_floor():
    logits = torch.tensor([[1e4, 0.0, -1e4, 0.0], [3.0, 3.0, 3.0, 3.0], [-50.0, -50.0, 50.0, -1e30]])
    logp, mu, sigma = mia.vocab_stats(logits)
    assert torch.isfinite(logp[:, :3]).all() and torch.isfinite(mu).all() and torch.isfinite(sigma).all()
    assert float(sigma[0]) == 0.0 and float(mu[0]) == 0.0  # all the mass on one token
    assert abs(float(mu[1]) - math.log(0.25)) < 1e-6 and float(sigma[1]) < 1e-6  # uniform: no spread
    stats = {"logp": logp[0, [0, 1]].double(), "mu": mu[[0, 0]].double(), "sigma": sigma[[0, 0]].double()}
    z_low = (float(logp[0, 1]) - 0.0) / mia.SIGMA_FLOOR  # the floor, not a division by 0
    assert mia.sequence_scores(stats, 0.5, None)["min_k_pp"] == pytest.approx(z_low)


def _model64_and_set():
    model = tiny_model("gpt_neo")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[3, 4:] = 0
    labels = ids.clone()
    labels[2, :5] = -100  # a question/answer row: only the answer scored
    labels[mask == 0] = -100
    return model, SequenceSet(ids, mask, torch.arange(5), labels)


def _reference_token_stats(model, seqs):
    """float64 model, whole (N, T, V) logits, no chunks."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits
    out = []
    for b in range(len(seqs)):
        logp, mu, sigma = reference_stats(logits[b, :-1])
        target = seqs.labels[b, 1:].clone()
        target[seqs.attention_mask[b, :-1] == 0] = -100
        keep = (target != -100).nonzero().flatten()
        out.append({"logp": logp[keep, target[keep]], "mu": mu[keep], "sigma": sigma[keep], "ids": target[keep]})
    return out


def test_token_stats_chunked_and_batched_equal_the_whole_float64_computation(monkeypatch):
    model, seqs = _model64_and_set()
    ref = _reference_token_stats(model, seqs)
    monkeypatch.setattr(mia, "STAT_ROWS", 3)  # several position chunks per row
    logits_mb = 2 * 11 * VOCAB * 4 / 2**20  # two rows' logits per forward: batches of 2, 2, 1
    model64, batches = copy.deepcopy(model).double(), []
    model64.register_forward_pre_hook(lambda m, a, kw: batches.append(len(kw["input_ids"])), with_kwargs=True)
    got = mia.token_stats(model64, seqs, logits_mb)
    assert batches == [2, 2, 1]
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
        assert torch.equal(g["ids"], r["ids"])
        for key in ("logp", "mu", "sigma"):
            torch.testing.assert_close(g[key], r[key], rtol=1e-10, atol=1e-12)
    assert [len(g["logp"]) for g in got] == [10, 6, 6, 3, 10]  # padding and prompt positions are not scored
    for g, r in zip(mia.token_stats(model, seqs, 1.0), ref):  # float32 model: float32 tolerance
        torch.testing.assert_close(g["logp"], r["logp"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g["sigma"], r["sigma"], rtol=1e-4, atol=1e-4)


def test_scores_by_hand():
    logp = torch.tensor([-1.0, -3.0, -2.0, -5.0, -4.0, -0.5, -6.0, -2.0, -1.0, -3.0], dtype=torch.float64)
    mu = torch.full((10,), -2.0, dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0, 1.0, 0.5, 4.0, 1.0, 8.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    stats = {"logp": logp, "mu": mu, "sigma": sigma}
    text = "the cat sat on the mat, the cat sat on the mat"
    scores = mia.sequence_scores(stats, 0.2, text)
    assert scores["loss"] == pytest.approx(-27.5 / 10)
    assert scores["zlib"] == pytest.approx(-2.75 / len(zlib.compress(text.encode(), 6)))
    assert scores["min_k"] == pytest.approx((-6.0 - 5.0) / 2)  # k = 0.2 of 10 tokens: the 2 lowest
    # z = (logp - mu) / sigma = [1, -0.5, 0, -6, -0.5, 1.5, -0.5, 0, 1, -0.5]: the 2 lowest -6 and -0.5 (a tie: same)
    assert scores["min_k_pp"] == pytest.approx((-6.0 - 0.5) / 2)
    assert mia.sequence_scores(stats, 0.05, None)["min_k"] == -6.0  # floor(0.5) = 0 -> at least one token
    assert mia.sequence_scores(stats, 0.05, None)["zlib"] is None
    assert mia.sequence_scores(stats, 1.0, None)["min_k"] == pytest.approx(-2.75)  # k = 1: every token


def test_auc_with_ties_by_hand_and_against_mann_whitney():
    # pairs (member, other): 1 vs 2 lose, 1 vs 0 win; 2 vs 2 tie (twice), 2 vs 0 win (twice) -> (3 + 2 x 0.5) / 6
    assert mia.auc([1.0, 2.0, 2.0], [2.0, 0.0]) == pytest.approx(4 / 6)
    assert mia.auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert mia.auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and mia.auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (17,), generator=g).tolist(), torch.randint(0, 5, (13,), generator=g).tolist()
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic  # U of the first sample, ties half
    assert mia.auc(a, b) == pytest.approx(u / (17 * 13), abs=1e-12)


def test_null_sd_and_privleak():
    assert mia.null_sd(8, 8) == pytest.approx(math.sqrt(17 / 768))
    assert mia.privleak(0.75, 0.5) == pytest.approx(0.5) and mia.privleak(0.25, 0.5) == pytest.approx(-0.5)
    assert mia.privleak(0.5, 0.0) is None
    # AUC variance of exchangeable samples: the formula against the exact variance of 4 vs 3 (every split)
    import itertools

    values = list(range(7))
    aucs = [mia.auc([values[i] for i in m], [values[i] for i in range(7) if i not in m])
            for m in itertools.combinations(range(7), 4)]  # fmt: skip
    mean = sum(aucs) / len(aucs)
    assert mean == pytest.approx(0.5)
    assert math.sqrt(sum((x - mean) ** 2 for x in aucs) / len(aucs)) == pytest.approx(mia.null_sd(4, 3))
