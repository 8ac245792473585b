"""Two processes (gloo, CPU, spawned here) give the one-process results: Fisher bit for bit (float64), the
low-rank factors and FILA's adapters bit for bit, and an unlearning run under DDP and FSDP2 the same
metrics (within 1e-6) and losses; a checkpoint written by two processes resumes in one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.dist_cases import DEVICE, run_here, spawn
from tests.helpers.tiny_models import MemorizerConfig, memorize

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="FASTUNLEARN_TEST_DIST_DEVICE=cuda needs 2 GPUs"
    ),
]

MEMORIZER = MemorizerConfig(vocab_size=32, seq_len=16, n_forget=8, n_retain=8, n_heldout=7, memorize_steps=150)
# 4 pairs of micro-batches per epoch: 2 per rank; a learning rate at which rounding differences stay small;
# 3 sequences per evaluation forward: the 7 held-out sequences take 2 forwards on rank 0, 1 on rank 1
RUN = {"rank": 4, "alpha": 8.0, "lr": 4e-3, "el_n": 5, "micro_batch_size": 2, "max_epochs": 4, "min_epochs": 4,
       "eval_batch_size": 3}  # fmt: skip


def assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name}: max difference {(got[name] - value).abs().max()}"


@pytest.fixture(scope="module")
def numerics(tmp_path_factory, one_thread) -> tuple[dict, dict]:
    """(two-process results, one-process results) of every Fisher variant, low-rank and FILA case."""
    work = tmp_path_factory.mktemp("numerics")
    return spawn("numerics", work / "two"), run_here("numerics", work / "one")


def _part(results: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("own_shards", [False, True], ids=["split-here", "own-shards"])
@pytest.mark.parametrize("mode", ["per_example", "per_batch"])
def test_fisher_two_processes_bit_for_bit(numerics, mode, own_shards):
    two, one = numerics
    expected = _part(one, f"fisher.{mode}.False.")  # the one-process run always gets the whole tensor
    assert expected["counts"].tolist() == [10, 10 * 11 - 4 * 5]  # 4 of 10 sequences padded after 7 tokens
    assert len(expected) > 1 and all(v.dtype == torch.float64 for k, v in expected.items() if k != "counts")
    assert_equal(_part(two, f"fisher.{mode}.{own_shards}."), expected)


@pytest.mark.parametrize("mode", ["per_example", "per_batch"])
def test_float32_fisher_two_processes_bit_for_bit(numerics, mode):
    """float32 Fisher: one float64 all-reduce of each rank's sum + error, rounded once (the one-process bits)."""
    two, one = numerics
    expected = _part(one, f"fisher32.{mode}.")
    assert len(expected) > 1 and all(v.dtype == torch.float32 for k, v in expected.items() if k != "counts")
    assert_equal(_part(two, f"fisher32.{mode}."), expected)


def test_lowrank_two_processes_bit_for_bit(numerics):
    two, one = numerics
    assert len(_part(one, "lowrank.")) == 7 * 3
    assert_equal(_part(two, "lowrank."), _part(one, "lowrank."))


def test_fila_two_processes_bit_for_bit(numerics):
    two, one = numerics
    assert any("lora_a0" in k for k in _part(one, "fila."))
    assert_equal(_part(two, "fila."), _part(one, "fila."))


def test_lockstep_lets_ranks_make_different_numbers_of_fsdp_forwards(tmp_path):
    """Rank 0 makes 1 forward call, rank 1 makes 2: without lockstep rank 1 would wait forever for rank 0's
    part of its second call's all-gathers; with it, every call returns the unsharded model's logits."""
    expected = run_here("lockstep", tmp_path / "one")["logits"]
    torch.testing.assert_close(spawn("lockstep", tmp_path / "two")["logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def memorizer_dir(tmp_path_factory, one_thread):
    work = tmp_path_factory.mktemp("memorizer")
    model, sets = memorize(MEMORIZER)
    model.save_pretrained(work / "model")
    save_file({k: v.contiguous() for k, v in sets.items()}, str(work / "data.st"))
    return work


def _fresh(memorizer_dir, path):
    path.mkdir()
    for name in ("model", "data.st"):
        (path / name).symlink_to(memorizer_dir / name)
    return path


def _epochs(log: dict, keys: tuple[str, ...]) -> list[float | None]:
    return [e[k] for task in log["tasks"] for e in task["epochs"] for k in keys]


def _assert_close_or_none(got: list, expected: list, **tolerance) -> None:
    assert [x is None for x in got] == [x is None for x in expected], (got, expected)  # e.g. EL skipped alike
    assert [x for x in got if x is not None] == pytest.approx([x for x in expected if x is not None], **tolerance)


def _assert_same_run(got: dict, expected: dict) -> None:
    """MA and EL within 1e-6 (fractions of tokens: equal); losses, gradient norms, retain perplexity and trained
    parameters within float rounding grown over a few AdamW updates (the ranks' sums are grouped differently).
    Nothing here is bit-equal by construction (unlike the Fisher and low-rank cases above, whose compensated sums
    and fixed per-layer seeds make them so), so every float is compared with a tolerance."""
    got_log, expected_log = (json.loads(bytes(r.pop("log").tolist())) for r in (got, expected))
    # the baseline, measured sharded and gathered: MA and EL count argmax hits (equal unless a near-tie flips);
    # perplexity sums per-sequence NLLs computed in other batches, so only its rounding may differ
    base, expected_base = got_log["baseline"], expected_log["baseline"]
    for a, b in zip(
        [*base["forget"], base["heldout"]], [*expected_base["forget"], expected_base["heldout"]], strict=True
    ):
        _assert_close_or_none([a["ma"], a["el"]], [b["ma"], b["el"]], abs=1e-6, rel=0)
    _assert_close_or_none([base["retain_ppl"]], [expected_base["retain_ppl"]], rel=1e-6)
    assert got_log["success"] == expected_log["success"]
    assert [t["stop_reason"] for t in got_log["tasks"]] == [t["stop_reason"] for t in expected_log["tasks"]]
    metrics = ("forget_ma", "forget_el")
    _assert_close_or_none(_epochs(got_log, metrics), _epochs(expected_log, metrics), abs=1e-6, rel=0)
    training = ("forget_loss", "retain_loss", "grad_norm", "retain_ppl")
    losses = ("forget_loss", "retain_loss", "grad_norm")  # epoch 1, before any update: only the sums' order differs
    _assert_close_or_none(_epochs(got_log, losses)[:3], _epochs(expected_log, losses)[:3], rel=1e-6)
    _assert_close_or_none(_epochs(got_log, training), _epochs(expected_log, training), rel=1e-4)
    assert got.keys() == expected.keys() and len(expected) > 0
    for name, value in expected.items():
        scale = value.abs().max().item()  # differences are relative to the weight's size, not to each entry
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_unlearning_two_processes_matches_one(memorizer_dir, tmp_path, parallel):
    config = {**RUN, "parallel": parallel, "eval_retain_ppl": True, "eval_every": 1}  # the perplexity every epoch
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config)
    got = spawn("unlearn", _fresh(memorizer_dir, tmp_path / "two"), config=config)
    assert (tmp_path / "two" / "run" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "two" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    _assert_same_run(got, expected)


@pytest.mark.parametrize("loss", ["ihl", "npo"])
def test_qa_unlearning_two_processes_matches_one(memorizer_dir, tmp_path, loss):
    """Question/answer rows (labels -100 on prompts and padding) under DDP: the ranks' micro-batches carry their
    labels, the token / sequence counts are the answer's, and sharded MA / EL are measured on the answers."""
    config = {
        **RUN,
        "forget_loss": loss,
        "eval_retain_ppl": True,
        **({"max_epochs": 2, "min_epochs": 2} if loss == "npo" else {}),
    }
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config, qa=True)
    got = spawn("unlearn", _fresh(memorizer_dir, tmp_path / "two"), config=config, qa=True)
    if loss == "ihl":
        _assert_same_run(got, expected)
        return
    got_log, expected_log = (json.loads(bytes(r.pop("log").tolist())) for r in (got, expected))
    (one, *_), (two, *_) = (log["tasks"][0]["epochs"] for log in (expected_log, got_log))
    for key in ("forget_loss", "retain_loss", "grad_norm", "forget_loss_range", "forget_ma"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_checkpoint_of_two_processes_resumes_in_one(memorizer_dir, tmp_path):
    config = {**RUN, "parallel": "fsdp"}
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config)
    work = _fresh(memorizer_dir, tmp_path / "two")
    assert "interrupted" in spawn("unlearn", work, config=config, interrupt_at=2)
    assert json.loads((work / "run" / "log.json").read_text())["status"] == "running"
    _assert_same_run(run_here("unlearn", work, config=config), expected)


def test_checkpoint_of_one_process_resumes_in_two(memorizer_dir, tmp_path):
    config = {**RUN, "parallel": "fsdp"}
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config)
    work = _fresh(memorizer_dir, tmp_path / "two")
    assert "interrupted" in run_here("unlearn", work, config=config, interrupt_at=2)
    got = spawn("unlearn", work, config=config)  # FSDP shards the saved full optimizer state
    assert json.loads(bytes(got["log"].tolist()))["resumes"] == 1
    _assert_same_run(got, expected)


def test_npo_two_processes_matches_one(memorizer_dir, tmp_path):
    """NPO under DDP: every rank computes the same cached reference, and the update's gradient is one process's
    (its norm, the losses and their micro-batch range within 1e-6). The trained weights are not compared: on the
    memorized forget set p(y) ~ 1, NPO's gradient entries are at rounding level and AdamW's first step (~lr x
    sign) turns a different summation order into different updates, as micro_batch_size does in one process."""
    config = {**RUN, "forget_loss": "npo", "npo_beta": 0.5, "max_epochs": 1, "min_epochs": 1}
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config)
    got = spawn("unlearn", _fresh(memorizer_dir, tmp_path / "two"), config=config)
    got_log, expected_log = (json.loads(bytes(r.pop("log").tolist())) for r in (got, expected))
    keys = ("forget_loss", "retain_loss", "grad_norm", "forget_loss_range")
    (one,), (two,) = (log["tasks"][0]["epochs"] for log in (expected_log, got_log))
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert one["forget_loss"] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-4)  # pi_theta ~ pi_ref (FILA)


def test_batched_updates_two_processes_match_one(memorizer_dir, tmp_path):
    """UnlearnConfig.batch_size under DDP: 2 updates an epoch, each update's 2 micro-batches split over the ranks."""
    config = {**RUN, "batch_size": 4}
    expected = run_here("unlearn", _fresh(memorizer_dir, tmp_path / "one"), config=config)
    got = spawn("unlearn", _fresh(memorizer_dir, tmp_path / "two"), config=config)
    _assert_same_run(got, expected)
