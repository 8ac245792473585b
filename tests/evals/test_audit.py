"""fastunlearn.audit on a tiny GPT-Neo that memorized random sequences: the quantization probe finds a planted
failure (an "unlearning" delta below Q4_1's bucket, which requantizing snaps back), relearning brings back rows of
an IHL-unlearned model (and does not at a negligible learning rate), membership AUCs of a memorized model, the
report files, the checks before compute, the caller's models and random state left as they were."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import fastunlearn
from fastunlearn.evals.audit import AuditConfig, AuditOutError, audit, measure, relearning
from fastunlearn.evals.audit.measure import as_set, ma_el, means
from fastunlearn.evals.audit.report import MD_MARKER
from fastunlearn.losses import causal_lm_ihl_loss, retain_loss, shift_causal
from fastunlearn.ops.quant import roundtrip_model
from tests.helpers.tiny_models import MemorizerConfig, memorize

pytestmark = pytest.mark.usefixtures("one_thread")
QUANT = AuditConfig(probes=("quantization",), formats=("q8_0", "q4_0", "q4_1", "q5_0", "nf4"))


def below_q4_1_bucket(model: torch.nn.Module, forget: torch.Tensor, steps: int = 20) -> torch.nn.Module:
    """A copy of ``model`` (whose weights lie on Q4_1's grid) pushed by projected IHL descent on ``forget``, each
    weight moved by less than 0.45 of its block's Q4_1 step and a block's extreme weights not at all: requantizing
    to Q4_1 gives ``model`` back exactly."""
    tuned = copy.deepcopy(model)
    bound, start = {}, {}
    for name, p in tuned.named_parameters():
        if p.dim() >= 2:
            blocks = p.detach().reshape(-1, 32)
            step = (blocks.max(1).values - blocks.min(1).values) / 15
            b = (0.45 * step)[:, None].expand_as(blocks).clone()
            b[(blocks == blocks.max(1, keepdim=True).values) | (blocks == blocks.min(1, keepdim=True).values)] = 0
            bound[name], start[name] = b.reshape(p.shape), p.detach().clone()
    for _ in range(steps):
        loss = causal_lm_ihl_loss(tuned(forget).logits, forget)
        tuned.zero_grad()
        loss.backward()
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if name in bound:
                    p.sub_(0.25 * bound[name] * p.grad.sign())
                    p.copy_(start[name] + (p - start[name]).clamp(-bound[name], bound[name]))
    tuned.zero_grad(set_to_none=True)
    return tuned.eval()


def near_duplicates(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` rows of one random sequence, each with 3 of its tokens replaced: text that repeats itself, whose
    rows a fine-tune on two of them brings back."""
    rows = torch.randint(0, vocab, (1, length), generator=generator).repeat(n, 1)
    for row in rows:
        row[torch.randperm(length, generator=generator)[:3]] = torch.randint(0, vocab, (3,), generator=generator)
    return rows


@pytest.fixture(scope="module")
def world():
    """The memorized model on Q4_1's grid (the "original", as SmolLM2 arrives), the planted model, the sets. The
    forget rows are near-duplicates; the held-out rows start like retain rows (12 memorized tokens, then 12
    random): a held-out level of MA ~0.48."""
    torch.set_num_threads(1)
    cfg = MemorizerConfig(n_forget=6, n_heldout=6, memorize_steps=200)
    model, sets = memorize(cfg)
    g = torch.Generator().manual_seed(5)
    sets["forget"] = near_duplicates(6, cfg.seq_len, cfg.vocab_size, g)
    train = torch.cat([sets["forget"], sets["retain"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    for _ in range(200):
        loss = retain_loss(*shift_causal(model(train).logits, train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    roundtrip_model(model, "q4_1", backup=False, progress=False)
    heldout = sets["retain"][:6].clone()
    heldout[:, 12:] = torch.randint(0, cfg.vocab_size, (6, 12), generator=g)
    planted = below_q4_1_bucket(model, sets["forget"])
    return {"original": model, "planted": planted, "forget": sets["forget"], "heldout": heldout,
            "retain": sets["retain"][6:]}  # fmt: skip


def test_quantization_probe_finds_the_planted_q4_1_failure(world):
    result = audit(world["planted"], world["forget"], world["heldout"], reference=world["original"], config=QUANT)
    q = result.report["quantization"]
    rows = {r["format"]: r for r in q["rows"]}
    assert list(rows) == ["float", "q8_0", "q4_0", "q4_1", "q5_0", "nf4"]
    assert rows["float"]["passed"] and rows["float"]["forget"]["ma"] < 0.1  # forgotten in float ...
    original = means(ma_el(world["original"], as_set("forget", world["forget"]), 10, 16))
    assert original["ma"] > 0.9 and rows["q4_1"]["forget"] == original  # ... and back, exactly, in Q4_1
    assert q["failed"] == ["q4_1"] and not result.passed
    assert rows["q4_1"]["limit"] == rows["q4_1"]["heldout_reference"]  # held-out on Q(reference)
    assert result.verdicts["quantization"].startswith("FAILED") and "q4_1" in result.verdicts["quantization"]
    alone = audit(world["planted"], world["forget"], world["heldout"], config=QUANT)  # no reference
    rows = {r["format"]: r for r in alone.report["quantization"]["rows"]}
    assert alone.report["quantization"]["failed"] == ["q4_1"]
    assert rows["q4_1"]["heldout_reference"] is None and rows["q4_1"]["limit"] == rows["q4_1"]["heldout"]
    ok = audit(world["planted"], world["forget"], world["heldout"], reference=world["original"],
               config=AuditConfig(probes=("quantization",), formats=("q8_0", "q5_0")))  # fmt: skip
    assert ok.passed and ok.verdicts["quantization"].startswith("PASSED")


def test_the_gguf_formats_are_audited_as_formats_like_maps_them(world, monkeypatch, tmp_path):
    from fastunlearn import gguf_io

    def fake_formats_like(model, template):
        return {name: "q4_1" if p.dim() >= 2 else "f32" for name, p in model.named_parameters()}

    monkeypatch.setattr(gguf_io, "formats_like", fake_formats_like)
    cfg = AuditConfig(probes=("quantization",), formats=("q4_1",))
    result = audit(world["planted"], world["forget"], world["heldout"], reference=world["original"], config=cfg,
                   gguf=tmp_path / "model.Q4_1.gguf")  # fmt: skip
    rows = result.report["quantization"]["rows"]
    assert rows[2]["format"] == "gguf (model.Q4_1.gguf: f32, q4_1)"
    assert rows[2]["forget"] == rows[1]["forget"] and rows[2]["limit"] == rows[1]["limit"]


def test_the_callers_models_and_random_state_are_left_as_they_were(world):
    before = {k: copy.deepcopy(m.state_dict()) for k, m in (("planted", world["planted"]),
                                                            ("original", world["original"]))}  # fmt: skip
    flags = [p.requires_grad for p in world["planted"].parameters()]
    rng = torch.random.get_rng_state()
    cfg = AuditConfig(formats=("q4_1", "nf4"), relearn_steps=2)
    audit(world["planted"], world["forget"], world["heldout"], reference=world["original"], retain=world["retain"],
          config=cfg)  # fmt: skip
    for key in before:
        after = world[key].state_dict()
        assert all(torch.equal(before[key][n], after[n]) for n in before[key]), key
    assert flags == [p.requires_grad for p in world["planted"].parameters()]
    assert torch.equal(rng, torch.random.get_rng_state())


@pytest.fixture(scope="module")
def ihl_unlearned(world):
    """The original unlearned with IHL (all weights, AdamW 1e-3) to 0.1 below the held-out MA: a shallow forgetting."""
    model = copy.deepcopy(world["original"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forget, heldout = as_set("forget", world["forget"]), as_set("heldout", world["heldout"])
    limit = means(ma_el(world["original"], heldout, 10, 16))
    limit["ma"] -= 0.1
    for _ in range(40):
        loss = causal_lm_ihl_loss(model(world["forget"]).logits, world["forget"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        if measure.meets(means(ma_el(model, forget, 10, 16)), limit):
            return model
        model.train()
    raise AssertionError("IHL did not reach the held-out level")


def test_relearning_brings_back_the_other_forget_rows(world, ihl_unlearned):
    cfg = AuditConfig(probes=("relearning",), relearn_lr=1e-3, relearn_steps=10)
    result = audit(ihl_unlearned, world["forget"], world["heldout"], reference=world["original"],
                   retain=world["retain"], config=cfg)  # fmt: skip
    rl = result.report["relearning"]
    relearn, control = rl["relearn"], rl["control"]
    assert relearn["after"]["ma"] > relearn["limit"]["ma"] >= rl["criterion"]["ma"]
    assert relearn["limit"]["ma"] == max(rl["criterion"]["ma"], control["after"]["ma"])
    assert not relearn["passed"] and not result.passed and result.verdicts["relearning"].startswith("FAILED")
    pre, before, after = rl["pre_unlearning"]["ma"], relearn["before"]["ma"], relearn["after"]["ma"]
    assert pre > 0.9 and relearn["recovered"]["ma"] == pytest.approx((after - before) / (pre - before))
    assert rl["benign"] is not None and rl["benign"]["trained_on"] == "2 retain rows"
    gentle = audit(ihl_unlearned, world["forget"], world["heldout"], reference=world["original"],
                   config=AuditConfig(probes=("relearning",), relearn_lr=1e-7))  # fmt: skip
    rl = gentle.report["relearning"]
    assert gentle.passed and rl["benign"] is None and "no retain set" in gentle.verdicts["relearning"]
    assert abs(rl["relearn"]["recovered"]["ma"]) < 0.05


def test_pre_unlearning_given_as_numbers(world, ihl_unlearned):
    cfg = AuditConfig(probes=("relearning",), relearn_steps=1, pre_ma=0.9)
    rl = audit(ihl_unlearned, world["forget"], world["heldout"], config=cfg).report["relearning"]
    assert rl["pre_unlearning"] == {"ma": 0.9, "el": None} and rl["relearn"]["recovered"]["el"] is None
    before, after = rl["relearn"]["before"]["ma"], rl["relearn"]["after"]["ma"]
    assert rl["relearn"]["recovered"]["ma"] == pytest.approx((after - before) / (0.9 - before))
    rl = audit(ihl_unlearned, world["forget"], world["heldout"],
               config=AuditConfig(probes=("relearning",), relearn_steps=1)).report["relearning"]  # fmt: skip
    assert rl["pre_unlearning"] is None and rl["relearn"]["recovered"] == {"ma": None, "el": None}


def test_relearned_copies_are_seeded(world):
    rows = as_set("forget", world["forget"][:2])
    cfg = AuditConfig(relearn_steps=3, relearn_lr=1e-3)
    a, b = (relearning.relearned(world["original"], rows, cfg, seed=7) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()["lm_head.weight"], world["original"].state_dict()["lm_head.weight"])


def test_membership_of_a_memorized_model(world, monkeypatch):
    monkeypatch.setattr("fastunlearn.evals.audit.run.ma_el", lambda *a, **k: pytest.fail("MA / EL not needed"))
    cfg = AuditConfig(probes=("membership",))
    result = audit(world["original"], world["forget"], world["heldout"], config=cfg)
    assert result.report["criterion"] is None and "Criterion" not in result.to_markdown()
    m = result.report["membership"]
    assert m["scores"]["loss"]["auc"] == 1.0 and not m["scores"]["loss"]["passed"]
    assert "under-unlearned" in result.verdicts["membership"] and not result.passed
    assert m["scores"]["zlib"]["auc"] is None  # no tokenizer
    assert m["margin"] == pytest.approx(2.5 * (13 / (12 * 36)) ** 0.5)
    same = audit(world["original"], world["forget"], world["heldout"], retrain=world["original"], config=cfg)
    assert same.passed and all(r["auc"] is None or r["privleak"] == 0.0 for r in same.report["membership"]["scores"]
                               .values())  # fmt: skip


def test_report_files_are_ours_and_only_ours_are_replaced(world, tmp_path):
    out = tmp_path / "audit"
    cfg = AuditConfig(probes=("membership",))
    result = audit(world["planted"], world["forget"], world["heldout"], config=cfg, out_dir=out)
    saved = json.loads((out / "audit.json").read_text())
    assert saved["fastunlearn_audit"] == 1 and saved["passed"] == result.passed
    assert (out / "audit.md").read_text().splitlines()[0] == MD_MARKER
    (out / "notes.txt").write_text("mine")
    audit(world["planted"], world["forget"], world["heldout"], config=cfg, out_dir=out)  # replaces its own
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "audit.md", "notes.txt"]
    (out / "audit.md").write_text("# my notes\n")
    with pytest.raises(AuditOutError, match="audit.md' exists and was not written by fastunlearn"):
        audit(world["planted"], world["forget"], world["heldout"], config=cfg, out_dir=out)
    assert (out / "audit.md").read_text() == "# my notes\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditOutError, match="is not a directory"):
        audit(world["planted"], world["forget"], world["heldout"], config=cfg, out_dir=tmp_path / "file")


def test_checks_before_compute(world, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before the checks")

    monkeypatch.setattr("fastunlearn.evals.audit.run.ma_el", no_compute)
    f, h = world["forget"], world["heldout"]
    with pytest.raises(ValueError, match="relearn_rows=6 leaves no forget set row to score"):
        audit(world["planted"], f, h, config=AuditConfig(relearn_rows=6))
    with pytest.raises(ValueError, match="forget set"):
        audit(world["planted"], f + 1000, h)  # token ids the model has no embedding for
    with pytest.raises(ValueError, match="heldout must be .N, T. integer token ids"):
        audit(world["planted"], f, h.float())
    with pytest.raises(ValueError, match="EL_10"):
        audit(world["planted"], f[:, :8], h)
    with pytest.raises(TypeError, match="reference must be a torch.nn.Module"):
        audit(world["planted"], f, h, reference="path")
    from fastunlearn import inject_lora

    adapted = copy.deepcopy(world["planted"])
    inject_lora(adapted, ["q_proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="model has LoRA adapters"):
        audit(adapted, f, h)


@pytest.mark.parametrize("field, value", [
    ("probes", ("quantization", "fuzz")), ("probes", ()), ("probes", "quantization"), ("formats", ("q3_k",)),
    ("el_n", 0), ("max_sequences", 1), ("relearn_steps", 0), ("relearn_lr", 0.0), ("relearn_rows", 0),
    ("pre_ma", 1.5), ("min_k", 0.0), ("membership_z", -1.0), ("logits_mb", 0), ("seed", -1),
])  # fmt: skip
def test_config_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        AuditConfig(**{field: value})


def test_progress_lines_with_eta(world, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fastunlearn.evals.audit")
    ticks = iter(range(0, 1000, 10))
    monkeypatch.setattr(measure, "clock", lambda: float(next(ticks)))
    audit(world["planted"], world["forget"], world["heldout"], config=AuditConfig(probes=("quantization",),
                                                                                 formats=("q8_0", "q4_1")))  # fmt: skip
    done = [r.getMessage() for r in caplog.records if " done, step " in r.getMessage()]
    assert done == [
        "audit: float model: MA and EL of the forget and held-out sets done, step 1/3, 10 s elapsed, ETA 20 s",
        "audit: quantization q8_0 done, step 2/3, 20 s elapsed, ETA 10 s",
        "audit: quantization q4_1 done, step 3/3, 30 s elapsed, ETA 0 s",
    ]


def test_top_level_export():
    assert fastunlearn.audit is audit and fastunlearn.AuditConfig is AuditConfig


def test_the_default_formats_are_the_deployed_ones():
    # llama.cpp's 8-, 4- and 5-bit block formats and bitsandbytes' NF4; the slow K-quants only on request
    assert AuditConfig().formats == ("q8_0", "q4_0", "q4_1", "q5_0", "nf4")
    assert AuditConfig().probes == ("quantization", "relearning", "membership")


def test_a_format_that_cannot_store_a_weight_is_refused_before_compute(monkeypatch):
    from tests.helpers.tiny_models import tiny_model

    monkeypatch.setattr("fastunlearn.evals.audit.run.ma_el", lambda *a, **k: pytest.fail("computed"))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("gpt_neo")  # hidden size 32: NF4's blocks of 64 do not fit its Linear rows
    with pytest.raises(ValueError, match="format 'nf4' cannot store model parameter 'transformer.h.0.attn"):
        audit(model, ids[:2], ids[2:], config=AuditConfig(probes=("quantization",), formats=("q4_k", "nf4")))


def test_non_finite_values_are_written_as_names():
    from fastunlearn.evals.audit.report import finite

    assert finite({"a": float("-inf"), "b": [1.0, float("nan")], "c": None}) == {"a": "-inf", "b": [1.0, "nan"],
                                                                                "c": None}  # fmt: skip
