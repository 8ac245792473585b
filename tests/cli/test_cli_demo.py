"""The command line and the offline demo (the README's main command): records memorized, cached, then unlearned
by the engine; the output directory rules; the cache check."""

from __future__ import annotations

import json

import pytest
import torch

from fastunlearn import cli
from fastunlearn.demo import toy as demo
from fastunlearn.demo.data import make_records
from fastunlearn.demo.toy import DemoConfig, main

# the demo pipeline at a third of the default size: memorized in ~50 steps, unlearned in ~25 epochs
SMALL = {"n_forget": 4, "n_retain": 8, "n_heldout": 4, "seq_len": 24, "n_examples": 2}
SIZES = {"forget": 5, "retain": 10, "heldout": 5}


def test_info_reports_the_paths(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "IHL on cpu tensors runs:" in out and "C++ extension" in out
    if torch.distributed.is_available():
        assert "torchrun backends (torch.distributed): " in out and "gloo" in out


def test_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["forget-everything"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"seq_len": 10}, "seq_len must be an int >= 11, got 10"),  # EL_10 needs 11 tokens
        ({"seq_len": 33}, "seq_len must be <= 32"),
        ({"n_forget": 0}, "n_forget must be an int >= 1, got 0"),
        ({"n_retain": 2.0}, "n_retain must be an int >= 1, got 2.0"),
        ({"seed": "0"}, "seed must be an int"),
        ({"hidden_size": 130}, "hidden_size must be a multiple of 4"),
        ({"n_examples": 13}, r"n_examples must be <= n_forget \(12\)"),
        ({"n_retain": 60}, r"n_forget \+ n_retain \+ n_heldout must be <= 80 \(one first name per record\), got 84"),
        ({"unlearn_lr": 0.0}, "unlearn_lr must be a finite number > 0"),
        ({"memorize_lr": float("nan")}, "memorize_lr must be a finite number > 0"),
    ],
)
def test_demo_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**bad)


def test_too_many_records_for_the_name_list():
    with pytest.raises(ValueError, match="at most 80 records in all"):
        make_records(0, {"forget": 40, "retain": 40, "heldout": 1})


def test_records_are_seeded_and_start_with_distinct_names():
    records = make_records(3, SIZES)
    assert records == make_records(3, SIZES) != make_records(4, SIZES)
    names = [text.split(",")[0].split()[0] for texts in records.values() for text in texts]
    assert len(set(names)) == 20 and all(" born " in t and " phone " in t for t in records["forget"])


def test_cli_passes_seed_out_and_cache_dir(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "main", lambda cfg: seen.append(cfg) or 0)
    assert cli.main(["demo", "--seed", "3", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert cli.main(["demo"]) == 0
    assert (seen[0].seed, seen[0].out_dir, seen[0].cache_dir) == (3, tmp_path / "o", tmp_path / "c")
    assert (seen[1].seed, str(seen[1].out_dir), seen[1].cache_dir) == (0, "fastunlearn-demo", None)


def test_cache_location(monkeypatch, tmp_path):
    records = make_records(0, SIZES)
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "env"))
    path = demo.cache_path(DemoConfig(), records)
    assert path.parent == tmp_path / "env" and path.name.startswith("demo-")
    assert demo.cache_path(DemoConfig(cache_dir=tmp_path / "flag"), records).parent == tmp_path / "flag"
    monkeypatch.delenv("FASTUNLEARN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.cache_path(DemoConfig(), records).parent == tmp_path / "home" / ".cache" / "fastunlearn"
    other = [demo.cache_path(DemoConfig(**change), records).name for change in ({"seed": 1}, {"memorize_steps": 9})]
    assert path.name not in other  # a different memorization is cached apart
    assert demo.cache_path(DemoConfig(unlearn_lr=1.0, rank=2, out_dir="x"), records).name == path.name


def test_out_dir_must_be_missing_empty_or_a_previous_demo_output(tmp_path, capsys):
    demo.check_out_dir(tmp_path / "missing")
    demo.check_out_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a previous demo output"):
        demo.check_out_dir(tmp_path)
    assert cli.main(["demo", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 2  # before any work
    assert "is not a previous demo output" in capsys.readouterr().err
    (tmp_path / "demo.json").write_text('{"my": "own file"}')  # a user's demo.json: not the demo's summary
    with pytest.raises(ValueError, match="is not a previous demo output"):
        demo.check_out_dir(tmp_path)
    (tmp_path / "notes.txt").unlink()
    with pytest.raises(ValueError, match="is not a previous demo output"):
        demo.check_out_dir(tmp_path)
    (tmp_path / "demo.json").write_text(json.dumps(dict.fromkeys(demo.SUMMARY_KEYS, 0)))
    demo.check_out_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a previous demo output but also holds notes.txt"):
        demo.check_out_dir(tmp_path)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        demo.check_out_dir(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "c").exists()


def test_a_corrupt_or_partial_cache_is_rebuilt(monkeypatch, tmp_path, capsys):
    cfg = DemoConfig(**SMALL, cache_dir=tmp_path)
    records = make_records(cfg.seed, cfg.sizes)
    calls = []

    def untrained(cfg, data, tokenizer):  # the cache logic, without the training
        calls.append(1)
        return demo.build_model(cfg, tokenizer).eval(), {"steps": 0, "train_ma": 0.0, "seconds": 0.0}

    monkeypatch.setattr(demo, "memorize", untrained)
    model, tokenizer, stats = demo.memorized_model(cfg, records)
    path = demo.cache_path(cfg, records)
    assert (len(calls), stats["cached"], stats["cache"]) == (1, False, str(path))
    assert not list(tmp_path.glob(".*"))  # no temporary directory left
    again, tokenizer2, stats = demo.memorized_model(cfg, records)
    assert (len(calls), stats["cached"]) == (1, True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert tokenizer2(records["forget"][0])["input_ids"] == tokenizer(records["forget"][0])["input_ids"]
    weights = path / "model.safetensors"
    for damage in (
        lambda: weights.write_bytes(weights.read_bytes()[:-100]),  # truncated
        lambda: (path / demo.MANIFEST).unlink(),  # partial: no manifest
        lambda: (path / demo.MANIFEST).write_text("{"),  # corrupt manifest
        lambda: (path / "tokenizer.json").unlink(),  # a file missing
    ):
        damage()
        model, _, stats = demo.memorized_model(cfg, records)
        assert not stats["cached"] and "is unusable" in capsys.readouterr().out
        assert demo.memorized_model(cfg, records)[2]["cached"]  # rebuilt and usable
    assert len(calls) == 5


def test_demo_memorizes_unlearns_then_reuses_the_cache(monkeypatch, tmp_path, capsys):
    """The whole pipeline at a small size: memorized, unlearned to the criterion by the engine, the outputs
    written; the second run loads the model from the cache and gives the same results."""
    out = tmp_path / "out"
    cfg = DemoConfig(**SMALL, out_dir=out, cache_dir=tmp_path / "cache")
    assert main(cfg) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    first = json.loads((out / "demo.json").read_text())
    before, after, rows = first["before"], first["after"], first["completions"]
    assert before["forget"]["ma"] >= 0.9 and before["forget"]["el"] >= 0.9  # memorized...
    assert before["heldout"]["ma"] <= 0.6 and before["heldout"]["el"] <= 0.1  # ...and the unseen records are not
    log = json.loads((out / "log.json").read_text())
    crit = log["criterion"]
    assert first["success"] and log["success"] and log["config"]["params"] == "fila"
    assert after["forget"]["ma"] <= crit["ma"] == before["heldout"]["ma"]  # the paper's criterion
    assert after["forget"]["el"] <= crit["el"] == before["heldout"]["el"]
    assert after["retain"]["ma"] >= 0.9  # the retained records survive
    assert len(rows) == 2 and all(r["before"] == r["record"] != r["after"] for r in rows)
    assert (out / "report.md").read_text().startswith("# Unlearning report")
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert {p.name for p in out.iterdir()} == demo.DEMO_OUTPUTS
    assert not first["memorization"]["cached"] and "Model memorized in" in printed
    for text in ("forget (4 records)", "held-out (4 records)", "retain perplexity", "SUCCESS: criterion met",
                 rows[0]["person"], "(verbatim)", str(out / "report.md"), str(out / "metrics.png")):  # fmt: skip
        assert text in printed

    (out / "report.md").write_text("stale")
    monkeypatch.setattr(demo, "memorize", lambda *args: pytest.fail("memorized again despite the cache"))
    assert main(cfg) == 0
    assert "Model loaded from the cache" in capsys.readouterr().out
    second = json.loads((out / "demo.json").read_text())
    assert second["memorization"]["cached"] and (out / "report.md").read_text() != "stale"  # replaced
    for key in ("before", "after", "completions", "success"):  # the cached model is the memorized one
        assert second[key] == first[key]

    one_epoch = DemoConfig(**SMALL, out_dir=out, cache_dir=tmp_path / "cache", unlearn_epochs=1)
    assert main(one_epoch) == 1  # same memorization, so the same cache; unlearning gives up after one epoch
    printed = capsys.readouterr().out
    assert "Model loaded from the cache" in printed
    assert "FAILURE: max_epochs (1) reached without meeting the criterion." in printed
    assert not json.loads((out / "demo.json").read_text())["success"]
