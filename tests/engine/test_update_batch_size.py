"""UnlearnConfig.batch_size (``--batch-size``): an epoch of ceil(N / batch_size) optimizer updates, each from the
mean over its own sequences whatever the micro-batches; None keeps ONE update per epoch, drawn exactly as before;
an interrupted run resumes bit-equal; every TOFU method runs with stop="epochs"."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from fastunlearn.cli.app import build_parser
from fastunlearn.data.text import SequenceSet, UnlearningData, iterate_batches
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.epoch import epoch_pairs, forget_batches, train_epoch
from fastunlearn.losses import forget_term, retain_term, token_logprobs

VOCAB, SEQ = 40, 10
NEVER = {"stop": "threshold", "ma_threshold": 0.0, "el_threshold": 0.0, "max_epochs": 1}  # train_epoch only


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: steady run times on shared cores
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0) -> GPTNeoForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=SEQ, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global"], 2]], window_size=SEQ, intermediate_size=64, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPTNeoForCausalLM(config).eval()


def ragged(lengths: list[int], seed: int) -> SequenceSet:
    """Rows of the given lengths, right-padded to SEQ (padding id 0, attention 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < torch.tensor(lengths)[:, None]).long()
    return SequenceSet(ids * mask, mask, torch.arange(len(lengths)))


class StepRecorder:
    """An optimizer stand-in: every step() keeps a copy of the accumulated gradients."""

    def __init__(self, params) -> None:
        self.params, self.steps = params, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.steps.append([p.grad.clone() for p in self.params])


def rows_of(batch: dict) -> list[list[int]]:
    return batch["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------------------
# config and draw
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "32"])
def test_batch_size_is_validated(value):
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1 or None \(the whole forget set\), got "):
        UnlearnConfig(batch_size=value)
    assert UnlearnConfig(batch_size=None).batch_size is None and UnlearnConfig(batch_size=32).batch_size == 32


def test_cli_flag_sets_the_config_field():
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o", "--batch-size", "32"])
    assert args.batch_size == 32
    assert build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o"]).batch_size is None


def test_default_is_one_update_drawn_exactly_as_before():
    forget = ragged([9, 5, 7, 2, 8, 6, 4], seed=1)
    cfg = UnlearnConfig(micro_batch_size=3, **NEVER)
    (update,) = forget_batches(forget, None, cfg, torch.Generator().manual_seed(5))
    before = list(iterate_batches(forget, 3, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert [rows_of(b) for b in update] == [rows_of(b) for b in before]


@pytest.mark.parametrize("batch_size, micro, sizes", [(3, 2, [[2, 1], [2, 1], [1]]), (4, 4, [[4], [3]]),
                                                      (32, 8, [[7]]), (1, 5, [[1]] * 7)])  # fmt: skip
def test_updates_cut_one_permutation(batch_size, micro, sizes):
    forget = ragged([9, 5, 7, 2, 8, 6, 4], seed=1)
    cfg = UnlearnConfig(batch_size=batch_size, micro_batch_size=micro, **NEVER)
    updates = forget_batches(forget, None, cfg, torch.Generator().manual_seed(5))
    assert [[len(b["input_ids"]) for b in u] for u in updates] == sizes
    order = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    drawn = [row for u in updates for b in u for row in rows_of(b)]
    assert drawn == forget.input_ids[order].tolist()  # every row once, in the permutation's order
    retain = ragged([6] * 5, seed=2)
    pairs = epoch_pairs(forget, retain, cfg, torch.Generator().manual_seed(5))
    flat = [r for u in pairs for _, r in u]
    assert len(flat) == sum(map(len, sizes))
    assert all(r is not None for r in flat)


# ---------------------------------------------------------------------------------------------------------
# the updates: one per batch, each the mean over its own sequences
# ---------------------------------------------------------------------------------------------------------
def mean_ga_gradient(model, rows: SequenceSet) -> list[torch.Tensor]:
    """The gradient of GA's forget term, the mean over the rows' next-token targets, in one pass."""
    model.zero_grad()
    logp, targets = token_logprobs(model, rows.batch())
    valid = targets != -100
    (logp[valid].sum() / valid.sum()).backward()  # GA: - (- log p) = + log p, summed over targets, divided by count
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_each_update_is_the_mean_over_its_sequences_for_any_micro_batch_size(batch_size):
    forget = ragged([9, 5, 7, 2, 8], seed=3)
    model = tiny_lm()
    params = list(model.parameters())
    steps = {}
    for micro in (1, 2, 4):
        cfg = UnlearnConfig(forget_loss="ga", retain_weight=0.0, params="full", batch_size=batch_size,
                            micro_batch_size=micro, **NEVER)  # fmt: skip
        recorder = StepRecorder(params)
        record = train_epoch(model, forget_term("ga"), retain_term(), recorder, params, forget, None, cfg,
                             torch.Generator().manual_seed(0), "cpu")  # fmt: skip
        assert record["updated"] and len(recorder.steps) == math.ceil(5 / batch_size)
        steps[micro] = recorder.steps
    order = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    for u, lo in enumerate(range(0, 5, batch_size)):
        rows = order[lo : lo + batch_size]
        want = mean_ga_gradient(model, SequenceSet(*(t[rows] for t in (forget.input_ids, forget.attention_mask)),
                                                   rows))  # fmt: skip
        for micro in (1, 2, 4):
            for got, expected in zip(steps[micro][u], want):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_adamw_steps_once_per_update_and_the_record_spans_the_epoch():
    forget, retain = ragged([9, 5, 7, 2, 8, 6, 4], seed=4), ragged([8] * 6, seed=5)
    model = tiny_lm()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    cfg = UnlearnConfig(forget_loss="ihl", params="full", batch_size=3, micro_batch_size=2, **NEVER)
    record = train_epoch(model, forget_term("ihl"), retain_term(), optimizer, params, forget, retain, cfg,
                         torch.Generator().manual_seed(0), "cpu")  # fmt: skip
    assert {float(optimizer.state[p]["step"]) for p in params} == {3.0}  # ceil(7 / 3)
    assert record["updated"] and record["retain_loss"] > 0 and record["grad_norm"] > 0
    low, high = record["forget_loss_range"]
    assert low <= record["forget_loss"] <= high


def test_a_non_finite_update_stops_the_epoch_without_it():
    forget = ragged([9, 5, 7, 2, 8], seed=3)
    model = tiny_lm()
    params = list(model.parameters())
    calls = []

    def term(model, batch):  # the second update's loss is NaN
        calls.append(len(calls))
        value = forget_term("ga")(model, batch)
        return value * math.nan if len(calls) > 2 else value

    recorder = StepRecorder(params)
    cfg = UnlearnConfig(forget_loss="ga", retain_weight=0.0, params="full", batch_size=2, micro_batch_size=1, **NEVER)
    record = train_epoch(model, term, retain_term(), recorder, params, forget, None, cfg,
                         torch.Generator().manual_seed(0), "cpu")  # fmt: skip
    assert not record["updated"] and len(recorder.steps) == 1 and len(calls) == 4  # stopped after update 2


# ---------------------------------------------------------------------------------------------------------
# whole runs: every TOFU method with stop="epochs", and an interrupted run resumes bit-equal
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return UnlearningData(ragged([9, 5, 7, 8, 6], seed=6), ragged([10] * 6, seed=7))


METHODS = {  # TOFU's methods as Cha et al. (Figure 5) run them: LoRA adapters, or FILA's
    "GA": {"forget_loss": "ga", "retain_weight": 0.0, "params": "lora"},
    "GD": {"forget_loss": "ga", "retain_weight": 1.0, "params": "lora"},
    "IHL": {"forget_loss": "ihl", "retain_weight": 1.0, "params": "lora"},
    "FILA + IHL": {"forget_loss": "ihl", "retain_weight": 1.0, "params": "fila"},
    "NPO": {"forget_loss": "npo", "retain_weight": 1.0, "params": "lora"},
}
RUN = {"rank": 2, "alpha": 4.0, "lr": 1e-2, "stop": "epochs", "batch_size": 2, "micro_batch_size": 2}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_tofu_method_runs_its_epochs_in_batches(method, data, tmp_path):
    config = UnlearnConfig(**METHODS[method], **RUN, max_epochs=2)
    result = unlearn(tiny_lm(), data, config, tmp_path / "run")
    epochs = result.log["tasks"][0]["epochs"]
    assert result.success and [e["epoch"] for e in epochs] == [1, 2] and all(e["updated"] for e in epochs)
    assert result.log["config"]["batch_size"] == 2
    assert "updates of 2 forget sequences (micro-batches of 2)" in (tmp_path / "run" / "report.md").read_text()


def test_an_interrupted_batched_run_resumes_bit_equal(data, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_after(epoch):
        def hook(k, record):
            if record["epoch"] == epoch:
                raise Interrupt

        return hook

    config = UnlearnConfig(**METHODS["FILA + IHL"], **{**RUN, "micro_batch_size": 1}, max_epochs=3)
    base = tiny_lm()
    reference = unlearn(copy.deepcopy(base), data, config, tmp_path / "whole")
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        unlearn(copy.deepcopy(base), data, config, out, on_epoch_end=stop_after(2))
    resumed = unlearn(copy.deepcopy(base), data, config, out)
    assert resumed.log["resumes"] == 1
    strip = ("train_s", "eval_s")
    for got, want in zip(resumed.log["tasks"][0]["epochs"], reference.log["tasks"][0]["epochs"], strict=True):
        assert {k: v for k, v in got.items() if k not in strip} == {k: v for k, v in want.items() if k not in strip}
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_resume_with_another_batch_size_is_refused(data, tmp_path):
    class Interrupt(Exception):
        pass

    def hook(k, record):
        raise Interrupt

    config = UnlearnConfig(**METHODS["IHL"], **RUN, max_epochs=2)
    with pytest.raises(Interrupt):
        unlearn(tiny_lm(), data, config, tmp_path / "run", on_epoch_end=hook)
    other = UnlearnConfig(**METHODS["IHL"], **{**RUN, "batch_size": 3}, max_epochs=2)
    with pytest.raises(ValueError, match=r"different config \(fields \['batch_size'\]\)"):
        unlearn(tiny_lm(), data, other, tmp_path / "run")
