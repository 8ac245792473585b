"""The relearning probe: do a few fine-tuning steps bring the forgotten text back?

Three fine-tunes, each of a fresh copy of the model (the caller's model is never trained), each ``relearn_steps``
plain AdamW steps (learning rate ``relearn_lr``, betas (0.9, 0.999), no weight decay, every parameter trained,
next-token cross-entropy ``fastunlearn.losses.retain_loss`` on the ``relearn_rows`` rows as one batch, in train
mode, seeded), on rows drawn by a generator seeded with ``seed + trial``:

- **relearn**: on ``relearn_rows`` forget rows; MA and EL_n of the OTHER forget rows are scored. Text the model saw
  is what an attacker (or a later fine-tune on overlapping data) can use to pull the rest back.
- **control**: the same on ``relearn_rows`` held-out rows, the other held-out rows scored: how much the same steps
  raise text the model never memorized (adapting to the domain, not recalling).
- **benign**: the same on ``relearn_rows`` retain rows (needs a retain set): the forget and held-out rows scored,
  as in an ordinary later fine-tune that never sees the forget set.

**Verdict.** The criterion is re-applied after the steps: the scored forget rows must stay at or below the limit
max(criterion, held-out rows after the same steps) in MA and in EL_n, where the criterion is the float one (held-out
set on the reference, else on the model) and "the held-out rows after the same steps" are the control's (relearn)
or the benign fine-tune's own held-out rows (benign). Either above: FAILED. With ``relearn_trials`` > 1 the values
are means over the trials' draws.

**Recovered fraction** (reported, not judged): (after - before) / (pre - before) for MA and EL_n on the scored
forget rows, where "before" is the unlearned model, "pre" the model before unlearning: the reference model on the
same rows, else the numbers ``pre_ma`` / ``pre_el`` given for the whole forget set; None without either, or where
unlearning removed nothing (pre <= before). The control's rise is given in the same unit (its after - before over
the forget set's pre - before).

Cost per trial: three copies of the model made one after the other (the model, its gradients and AdamW's two
moments: 4x its size while one trains), ``3 x relearn_steps`` forward and backward passes of ``relearn_rows`` rows,
and MA and EL_n of the scored rows four times.
"""

from __future__ import annotations

import copy
import gc

import torch
from torch import Tensor, nn

from fastunlearn.data.text import SequenceSet
from fastunlearn.evals.audit.config import AuditConfig
from fastunlearn.evals.audit.measure import Steps, higher, ma_el, means, meets
from fastunlearn.losses import retain_loss, shift_causal

Values = dict[str, Tensor]
BETAS = (0.9, 0.999)  # torch's AdamW defaults: what a fine-tune that is not tuned against unlearning uses


def relearned(model: nn.Module, rows: SequenceSet, cfg: AuditConfig, seed: int) -> nn.Module:
    """A copy of ``model`` after ``cfg.relearn_steps`` AdamW steps on ``rows`` (one batch), in eval mode. The
    caller's random state is kept (a forked generator seeded with ``seed``)."""
    tuned = copy.deepcopy(model)
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=cfg.relearn_lr, betas=BETAS, weight_decay=0.0)
    batch = {k: v.to(device) for k, v in rows.batch().items()}
    labels = batch.pop("labels", None)
    tuned.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(cfg.relearn_steps):
            logits = tuned(**batch).logits
            loss = retain_loss(*shift_causal(logits, batch["input_ids"], batch["attention_mask"], labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    del optimizer
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return tuned.eval()


def _split(n: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    return perm[:k].sort().values, perm[k:].sort().values


def _score(model: nn.Module, sets: dict[str, SequenceSet], cfg: AuditConfig) -> dict[str, dict[str, float]]:
    out = {name: means(ma_el(model, seqs, cfg.el_n, cfg.batch_size)) for name, seqs in sets.items()}
    del model
    gc.collect()
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _fraction(after: dict, before: dict, pre: dict | None) -> dict[str, float | None]:
    if pre is None:
        return {"ma": None, "el": None}
    return {k: (after[k] - before[k]) / (pre[k] - before[k]) if pre.get(k) is not None and pre[k] > before[k]
            else None for k in before}  # fmt: skip


def probe_relearning(
    model: nn.Module, forget: SequenceSet, heldout: SequenceSet, cfg: AuditConfig, float_values: dict[str, Values],
    criterion: dict[str, float], steps: Steps, *, retain: SequenceSet | None = None,
) -> dict:  # fmt: skip
    """The probe's report (see the module docstring). ``float_values``: per-sequence {"forget", "heldout"} of the
    model and, with a reference, "forget_reference"; ``criterion``: the float limits {"ma", "el"}."""
    r = cfg.relearn_rows
    trials: dict[str, list] = {"relearn": [], "control": [], "benign": [], "pre": []}
    for trial in range(cfg.relearn_trials):
        seed = cfg.seed + trial
        g = torch.Generator().manual_seed(seed)
        f_train, f_scored = _split(len(forget), r, g)
        h_train, h_scored = _split(len(heldout), r, g)
        forget_before, held_before = means(float_values["forget"], f_scored), means(float_values["heldout"], h_scored)
        if "forget_reference" in float_values:
            trials["pre"].append(means(float_values["forget_reference"], f_scored))
        steps.start(f"relearning trial {trial + 1}: {r} forget rows")
        after = _score(relearned(model, forget[f_train], cfg, seed), {"forget": forget[f_scored]}, cfg)
        trials["relearn"].append({"before": forget_before, "after": after["forget"]})
        steps.done()
        steps.start(f"relearning trial {trial + 1}: control, {r} held-out rows")
        after = _score(relearned(model, heldout[h_train], cfg, seed), {"heldout": heldout[h_scored]}, cfg)
        trials["control"].append({"before": held_before, "after": after["heldout"]})
        steps.done()
        if retain is not None:
            steps.start(f"relearning trial {trial + 1}: benign, {r} retain rows")
            r_rows = torch.randperm(len(retain), generator=g)[:r].sort().values
            after = _score(relearned(model, retain[r_rows], cfg, seed),
                           {"forget": forget[f_scored], "heldout": heldout[h_scored]}, cfg)  # fmt: skip
            trials["benign"].append({"before": forget_before, "after": after["forget"],
                                     "heldout_after": after["heldout"]})  # fmt: skip
            steps.done()
    return _report(trials, cfg, criterion, len(forget), len(heldout), retain)


def _report(trials: dict, cfg: AuditConfig, criterion: dict, n_forget: int, n_heldout: int, retain) -> dict:
    r, n = cfg.relearn_rows, cfg.el_n

    def avg(name: str, key: str) -> dict[str, float]:
        return _mean([t[key] for t in trials[name]])

    pre, pre_from = None, None
    if trials["pre"]:
        pre, pre_from = _mean(trials["pre"]), "the reference model on the scored forget rows"
    elif cfg.pre_ma is not None or cfg.pre_el is not None:
        pre, pre_from = {"ma": cfg.pre_ma, "el": cfg.pre_el}, "given (pre_ma / pre_el, the whole forget set)"
    relearn = {"trained_on": f"{r} forget rows", "scored_on": f"the other {n_forget - r} forget rows",
               "before": avg("relearn", "before"), "after": avg("relearn", "after")}  # fmt: skip
    control = {"trained_on": f"{r} held-out rows", "scored_on": f"the other {n_heldout - r} held-out rows",
               "before": avg("control", "before"), "after": avg("control", "after")}  # fmt: skip
    relearn["recovered"] = _fraction(relearn["after"], relearn["before"], pre)
    rise = {k: control["after"][k] - control["before"][k] for k in ("ma", "el")}
    control["rise_fraction"] = {k: rise[k] / (pre[k] - relearn["before"][k])
                                if pre is not None and pre.get(k) is not None and pre[k] > relearn["before"][k]
                                else None for k in rise}  # fmt: skip
    relearn["limit"] = higher(criterion, control["after"])
    relearn["passed"] = meets(relearn["after"], relearn["limit"])
    benign = None
    if trials["benign"]:
        benign = {"trained_on": f"{r} retain rows", "scored_on": f"the other {n_forget - r} forget rows and "
                  f"{n_heldout - r} held-out rows", "before": avg("benign", "before"), "after": avg("benign", "after"),
                  "heldout_after": avg("benign", "heldout_after")}  # fmt: skip
        benign["recovered"] = _fraction(benign["after"], benign["before"], pre)
        benign["limit"] = higher(criterion, benign["heldout_after"])
        benign["passed"] = meets(benign["after"], benign["limit"])
    passed = relearn["passed"] and (benign is None or benign["passed"])
    steps_text = f"{cfg.relearn_steps} AdamW steps (lr {cfg.relearn_lr:g})"
    parts = []
    for probe, on in ((relearn, f"{r} forget rows"), (benign, f"{r} retain rows")):
        if probe is None:
            continue
        frac = probe["recovered"]["ma"]
        back = "" if frac is None else f", {frac:.0%} of the MA unlearning removed"
        state = "back above" if not probe["passed"] else "stays at or below"
        parts.append(f"{steps_text} on {on}: the other forget rows' MA {probe['after']['ma']:.3f} / EL_{n} "
                     f"{probe['after']['el']:.3f}, {state} the limit {probe['limit']['ma']:.3f} / "
                     f"{probe['limit']['el']:.3f}{back}")  # fmt: skip
    verdict = ("PASSED: " if passed else "FAILED: ") + "; ".join(parts)
    if retain is None:
        verdict += " (benign fine-tune not run: no retain set)"
    return {
        "settings": {"steps": cfg.relearn_steps, "lr": cfg.relearn_lr, "rows": r, "trials": cfg.relearn_trials,
                     "optimizer": f"AdamW, betas {BETAS}, no weight decay, every parameter, the rows as one batch"},
        "criterion": criterion,
        "pre_unlearning": pre,
        "pre_unlearning_from": pre_from,
        "relearn": relearn,
        "control": control,
        "benign": benign,
        "passed": passed,
        "verdict": verdict,
    }  # fmt: skip
