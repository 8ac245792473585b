"""NPO and SimNPO: the objectives against float64 formulas, their fused path, the engine's normalization over
forget sequences (independent of micro_batch_size), the cached reference (equal to a two-model computation,
kept in the checkpoint, read back on resume), the config, CLI and Hugging Face trainer options."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastunlearn import cli
from fastunlearn import losses as objectives
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine import UnlearnConfig, reference, unlearn
from fastunlearn.engine.epoch import train_epoch
from fastunlearn.engine.inputs import batch
from fastunlearn.fused_lm import patch_fused_ihl
from fastunlearn.lora.layer import adapters_disabled, inject_lora
from fastunlearn.losses import forget_term, npo_loss, retain_term, simnpo_loss
from tests.helpers.runs import FAST, NEVER, Interrupt, ragged, stop_at
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_sequence_logprob(model, seqs: SequenceSet) -> torch.Tensor:
    """(N,) float64: sum over each row's next-token targets of log softmax(logits)[target], from the logits."""
    with torch.no_grad():
        logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, seqs.input_ids[:, 1:, None])[..., 0]
    valid = (seqs.attention_mask[:, 1:] == 1) & (seqs.attention_mask[:, :-1] == 1)
    return (logp * valid).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------------------
def test_npo_and_simnpo_match_their_formulas_in_value_and_gradient():
    logp = torch.tensor([-30.0, -5.0, -12.5, 0.0, -80.0], dtype=torch.float64)
    ref = torch.tensor([-28.0, -9.0, -12.5, 0.0, -60.0], dtype=torch.float64)
    lengths = torch.tensor([10, 4, 7, 0, 40])  # row 3 has no target: left out
    counted = lengths > 0
    for beta in (0.1, 1.0):
        leaf = logp.float().requires_grad_(True)
        got = npo_loss(leaf, ref.float(), beta=beta, lengths=lengths)
        got.backward()
        x = logp.clone().requires_grad_(True)
        rows = (2 / beta) * torch.log1p(torch.exp(beta * (x - ref)))  # -(2/b) log sigmoid(-b (logp - ref))
        want = rows[counted].sum() / counted.sum()
        want.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(leaf.grad.double(), x.grad, rtol=1e-5, atol=1e-8)
        assert leaf.grad[3] == 0
    for beta, gamma in ((4.5, 0.0), (2.5, 1.0)):
        leaf = logp.float().requires_grad_(True)
        got = simnpo_loss(leaf, lengths, beta=beta, gamma=gamma, reduction="sum")
        got.backward()
        x = logp.clone().requires_grad_(True)
        rows = (2 / beta) * torch.log1p(torch.exp(beta * x / lengths.clamp(min=1) + gamma))
        want = rows[counted].sum()
        want.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(leaf.grad.double(), x.grad, rtol=1e-5, atol=1e-8)
    at_reference = npo_loss(ref.float(), ref.float(), beta=0.1, reduction="none")
    torch.testing.assert_close(at_reference, torch.full((5,), 20 * math.log(2)))  # (2 / beta) log 2


def test_sequence_losses_reject_bad_options():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0"):
        npo_loss(x, x, beta=0)
    with pytest.raises(ValueError, match=r"ref_logp has shape \(2,\) but logp has \(3,\)"):
        npo_loss(x, x[:2])
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -1"):
        simnpo_loss(x, torch.ones(3), gamma=-1)
    with pytest.raises(ValueError, match="beta is a parameter of .'npo', 'simnpo'., not of forget_loss='ihl'"):
        forget_term("ihl", beta=0.5)
    with pytest.raises(ValueError, match="gamma is a parameter of 'simnpo', not of forget_loss='npo'"):
        forget_term("npo", gamma=0.5)
    with pytest.raises(ValueError, match=r"forget_loss must be one of \('ihl', 'ga', 'npo', 'simnpo'\), got 'dpo'"):
        forget_term("dpo")


@pytest.mark.parametrize("loss", ["npo", "simnpo"])
def test_forget_term_equals_the_hand_computation_fused_or_not(loss):
    seqs = ragged([9, 5, 7, 2], seed=1)
    model = patch_fused_ihl(tiny_model("gpt_neo"))
    ref = torch.tensor([-40.0, -20.0, -30.0, -3.0])
    batch = {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask, "reference": ref}
    logp = hand_sequence_logprob(model, seqs)
    lengths = torch.tensor([8, 4, 6, 1], dtype=torch.float64)
    if loss == "npo":
        want = (20 * torch.log1p(torch.exp(0.1 * (logp - ref.double())))).sum()
    else:
        want = (2 / 4.5 * torch.log1p(torch.exp(4.5 * logp / lengths))).sum()
    grads = []
    for fused in (False, True):
        model.zero_grad()
        got = forget_term(loss, fused=fused)(model, batch)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        grads.append([p.grad.clone() for p in model.parameters()])
    for unfused, fused in zip(*grads):
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6)
    if loss == "npo":
        with pytest.raises(ValueError, match="needs the reference log-likelihoods in batch\\['reference'\\]"):
            forget_term("npo")(model, {k: v for k, v in batch.items() if k != "reference"})


@pytest.mark.parametrize("term", ["ga", "retain"])
def test_token_terms_from_hidden_states_equal_the_logits_path(term):
    """GA and the retain term on the fused log-prob: -CE and CE summed over the targets, value and gradient."""
    seqs = ragged([9, 5, 7, 2], seed=2)
    model = patch_fused_ihl(tiny_model("gpt_neo"))
    batch = {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask}
    logp = hand_sequence_logprob(model, seqs)  # (B,) float64 sums over each row's targets
    want = logp.sum() if term == "ga" else -logp.sum()
    grads = []
    for fused in (False, True):
        model.zero_grad()
        got = (forget_term("ga", fused=fused) if term == "ga" else retain_term(fused=fused))(model, batch)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        grads.append([p.grad.clone() for p in model.parameters()])
    for unfused, fused in zip(*grads):
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The engine: one update from the mean over the forget sequences, whatever the micro-batches
# ---------------------------------------------------------------------------------------------------------
class GradientRecorder:
    """An optimizer stand-in: step() keeps the accumulated gradients."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


@pytest.mark.parametrize("loss", ["npo", "simnpo"])
def test_epoch_gradient_is_the_sequence_mean_for_any_micro_batch_size(loss):
    forget = ragged([9, 5, 7, 2, 8], seed=3)
    model = tiny_model("gpt_neo")
    ref = hand_sequence_logprob(model, forget).float() + torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    params = list(model.parameters())
    grads = {}
    for size in (1, 2, 5):
        cfg = UnlearnConfig(forget_loss=loss, micro_batch_size=size, retain_weight=0.0, params="full", **NEVER)
        recorder = GradientRecorder(params)
        terms = forget_term(loss, **cfg.objective_options()), retain_term()
        train_epoch(model, *terms, recorder, params, forget, None, cfg, torch.Generator().manual_seed(0), "cpu",
                    reference=ref if loss == "npo" else None)  # fmt: skip
        grads[size] = recorder.grads
    model.zero_grad()
    logp, lengths = objectives.sequence_logprob(*objectives.token_logprobs(model, batch(forget)))
    mean = npo_loss(logp, ref, lengths=lengths) if loss == "npo" else simnpo_loss(logp, lengths)
    mean.backward()  # the mean over the 5 sequences, in one pass
    for size in (1, 2, 5):
        for got, p in zip(grads[size], params):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# The cached reference, the checkpoint and resume
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["lora", "fila"])
def test_cached_reference_equals_a_second_model_and_resume_reads_it(memorized, tmp_path, monkeypatch, params):
    base, data = memorized
    config = UnlearnConfig(**FAST, **NEVER, forget_loss="npo", npo_beta=0.5, params=params, max_epochs=3)
    whole = unlearn(copy.deepcopy(base), data, config, tmp_path / "whole")
    two_models = hand_sequence_logprob(copy.deepcopy(base), data.forget)  # what a held reference model gives

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        unlearn(copy.deepcopy(base), data, config, out, on_epoch_end=stop_at(1))
    (version,) = (out / ".fastunlearn").glob("checkpoint-*")
    cached = load_file(str(version / "state.safetensors"))["reference.0"]
    assert cached.dtype == torch.float32 and cached.shape == (len(data.forget),)
    torch.testing.assert_close(cached.double(), two_models, rtol=1e-6, atol=1e-5)
    epoch_1 = whole.log["tasks"][0]["epochs"][0]["forget_loss"]  # pi_theta = pi_ref before the first update
    assert epoch_1 == pytest.approx(2 / 0.5 * math.log(2), rel=1e-4 if params == "fila" else 1e-6)

    def never(*args, **kwargs):
        raise AssertionError("a resume recomputed the reference")

    monkeypatch.setattr(reference, "sequence_logprobs", never)
    resumed = unlearn(copy.deepcopy(base), data, config, out)
    strip = lambda log: [{k: v for k, v in e.items() if not k.endswith("_s")} for e in log["tasks"][0]["epochs"]]  # noqa: E731
    assert strip(resumed.log) == strip(whole.log) and resumed.log["resumes"] == 1
    for (name, got), want in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(got, want), name


def test_reference_helper_disables_adapters():
    seqs = ragged([9, 6], seed=4)
    model = tiny_model("gpt_neo")
    before = reference.sequence_logprobs(model, seqs)
    layers = inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_b, std=0.5)  # adapters that change the output
    changed = hand_sequence_logprob(model, seqs)
    assert (changed.float() - before).abs().max() > 1e-2
    torch.testing.assert_close(reference.sequence_logprobs(model, seqs), before)  # adapters off inside
    assert not any(layer.disabled for layer in layers.values())  # and back on after
    with adapters_disabled(model):
        torch.testing.assert_close(hand_sequence_logprob(model, seqs).float(), before, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hand_sequence_logprob(model, seqs), changed)


# ---------------------------------------------------------------------------------------------------------
# Config and CLI
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"forget_loss": "dpo"}, r"forget_loss must be one of \('ihl', 'ga', 'npo', 'simnpo'\), got 'dpo'"),
        ({"npo_beta": 0.0}, "npo_beta must be a finite number > 0, got 0.0"),
        ({"simnpo_beta": float("inf")}, "simnpo_beta must be a finite number > 0"),
        ({"simnpo_gamma": -0.5}, "simnpo_gamma must be a finite number >= 0, got -0.5"),
    ],
)
def test_config_validates_the_objective(fields, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**fields)


def test_config_objective_options():
    assert UnlearnConfig(forget_loss="npo", npo_beta=0.2).objective_options() == {"beta": 0.2}
    assert UnlearnConfig(forget_loss="simnpo", simnpo_gamma=1.0, fused_ihl=True).objective_options() == {
        "beta": 4.5, "gamma": 1.0}  # fmt: skip
    assert UnlearnConfig().objective_options() == {}


def test_cli_loss_beta_gamma(workspace, capsys):
    common = ["unlearn", "--model", str(workspace / "model"), "--forget", str(workspace / "forget.txt"),
              "--retain", str(workspace / "retain.txt"), "--heldout", str(workspace / "heldout.txt"),
              "--params", "lora", "--rank", "2", "--max-epochs", "1", "--seq-len", "12"]  # fmt: skip
    assert cli.main([*common, "--loss", "npo", "--beta", "0.3", "--out", str(workspace / "npo")]) in (0, 1)
    log = json.loads((workspace / "npo" / "log.json").read_text())
    assert (log["config"]["forget_loss"], log["config"]["npo_beta"]) == ("npo", 0.3)
    assert log["tasks"][0]["epochs"][0]["forget_loss"] == pytest.approx(2 / 0.3 * math.log(2), rel=1e-6)
    for extra, message in [
        (["--loss", "ihl", "--beta", "0.1"], "--beta is a parameter of --loss npo or simnpo, not of --loss ihl"),
        (["--loss", "npo", "--gamma", "1"], "--gamma is a parameter of --loss simnpo, not of --loss npo"),
        (["--loss", "simnpo", "--beta", "0"], "--beta must be a finite number > 0, got 0.0"),
        (["--loss", "simnpo", "--gamma", "nan"], "--gamma must be a finite number >= 0, got nan"),
    ]:
        capsys.readouterr()
        assert cli.main([*common, *extra, "--out", str(workspace / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (workspace / "bad").exists()
