"""The probes of ``durability.py`` behind one small interface, ``backend(kind)``: ``reference(...)`` (the memorized
model's values, once per cell) and ``probe(...)`` (one unlearned model) return the same dict shape,

    {"quantization": {"rows": [{"format", "forget", "heldout", "heldout_reference", "limit", "passed"}, ...]},
     "relearning": {"relearn": {"before", "after", "limit", "passed"}, "control": {"before", "after"}, "passed"}}

from ``fastunlearn.evals.audit`` ("audit") or from the local implementation below ("local"), which applies the
same rules: in format Q the forget set's MA and EL_10 on Q(model) must be at or below the held-out set's on
Q(memorized model) (Q round-trips the weights as ``UnlearnConfig.deploy_quant`` does: every weight matrix, NF4 the
linear layers but the output layer, "gguf" each weight in the input file's type; the unlearned model's held-out
set is not measured, the verdict does not need it); relearning: 10 AdamW steps (lr
1e-4, betas (0.9, 0.999), no weight decay, every weight) on 2 forget rows as one batch, the other forget rows
scored, against the limit max(float criterion, the held-out rows after the same steps on 2 held-out rows).
"""

from __future__ import annotations

import copy

EL_N = 10
BATCH = 16
RELEARN = {"steps": 10, "lr": 1e-4, "rows": 2, "seed": 0}


def backend(kind: str):
    if kind in ("auto", "audit"):
        try:
            from fastunlearn.evals.audit import AuditConfig, audit  # noqa: F401
        except ImportError:
            if kind == "audit":
                raise SystemExit("durability: --probes audit needs fastunlearn.evals.audit (not installed)") from None
            return LocalProbes()
        return AuditProbes()
    return LocalProbes()


def _mean_ma_el(model, seqs) -> dict:
    import torch

    from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy

    with torch.no_grad():
        ids, mask = seqs.input_ids, seqs.attention_mask
        ma = memorization_accuracy(model, ids, mask, batch_size=BATCH).mean().item()
        el = extraction_likelihood(model, ids, EL_N, attention_mask=mask, batch_size=BATCH).mean().item()
    return {"ma": ma, "el": el}


def _meets(values: dict, limit: dict) -> bool:
    return values["ma"] <= limit["ma"] and values["el"] <= limit["el"]


def _plans(model, formats, gguf_file):
    from fastunlearn import gguf_io
    from fastunlearn.engine.quantized import DeployWeights

    plans = {fmt: DeployWeights.of(model, fmt) for fmt in formats}
    plans["gguf"] = DeployWeights.of(model, gguf_io.formats_like(model, gguf_file))
    return plans


class LocalProbes:
    name = "local"

    def reference(self, memorized, forget, heldout, formats, gguf_file) -> dict:
        """{format or "float" or "gguf": {"forget", "heldout"}} of the memorized model."""
        out = {"float": {"forget": _mean_ma_el(memorized, forget), "heldout": _mean_ma_el(memorized, heldout)}}
        for fmt, plan in _plans(memorized, formats, gguf_file).items():
            with plan.deployed(memorized):
                out[fmt] = {"forget": _mean_ma_el(memorized, forget), "heldout": _mean_ma_el(memorized, heldout)}
        return out

    def probe(self, model, memorized, forget, heldout, retain, formats, gguf_file, before) -> dict:
        import time

        rows = []
        for fmt, plan in [("float", None), *_plans(model, formats, gguf_file).items()]:
            start = time.perf_counter()
            # the verdict needs the forget set only (its limit is the memorized model's held-out set, measured
            # once in reference()); the unlearned model's held-out values would double a probe's cost
            if plan is None:
                values = {"forget": _mean_ma_el(model, forget), "heldout": None}
            else:
                with plan.deployed(model):
                    values = {"forget": _mean_ma_el(model, forget), "heldout": None}
            limit = before[fmt]["heldout"]
            seconds = time.perf_counter() - start
            rows.append({"format": fmt, **values, "heldout_reference": limit, "limit": limit,
                         "passed": _meets(values["forget"], limit), "seconds": seconds})  # fmt: skip
        return {"backend": self.name, "quantization": {"rows": rows},
                "relearning": self._relearning(model, forget, heldout, before["float"]["heldout"])}  # fmt: skip

    def _relearning(self, model, forget, heldout, criterion: dict) -> dict:
        f_train, f_scored, h_train, h_scored = relearn_split(len(forget), len(heldout))
        relearn = {"before": _mean_ma_el(model, forget[f_scored]),
                   "after": _mean_ma_el(_relearned(model, forget[f_train]), forget[f_scored])}  # fmt: skip
        control = {"before": _mean_ma_el(model, heldout[h_scored]),
                   "after": _mean_ma_el(_relearned(model, heldout[h_train]), heldout[h_scored])}  # fmt: skip
        relearn["limit"] = {k: max(criterion[k], control["after"][k]) for k in ("ma", "el")}
        relearn["passed"] = _meets(relearn["after"], relearn["limit"])
        settings = {**RELEARN, "optimizer": "AdamW, betas (0.9, 0.999), no weight decay, every weight"}
        return {"settings": settings, "relearn": relearn, "control": control, "passed": relearn["passed"]}


def relearn_split(n_forget: int, n_heldout: int):
    """(forget rows trained, forget rows scored, held-out rows trained, held-out rows scored): the relearning
    probe's seeded split, the same for every method of a cell."""
    import torch

    g = torch.Generator().manual_seed(RELEARN["seed"])
    r = RELEARN["rows"]
    f_order, h_order = torch.randperm(n_forget, generator=g), torch.randperm(n_heldout, generator=g)
    return f_order[:r].sort().values, f_order[r:].sort().values, h_order[:r].sort().values, h_order[r:].sort().values


def scored_rows(memorized, forget, heldout) -> dict:
    """The memorized model's MA / EL_n on the rows the relearning probe scores: where "all the way back" is, so
    that a probe's rise can be read as a fraction of what the unlearning removed from those rows."""
    _, f_scored, _, h_scored = relearn_split(len(forget), len(heldout))
    return {"forget": _mean_ma_el(memorized, forget[f_scored]), "heldout": _mean_ma_el(memorized, heldout[h_scored])}


def _relearned(model, rows):
    """A copy of ``model`` after RELEARN["steps"] AdamW steps on ``rows`` (one batch), in eval mode."""
    import torch

    from fastunlearn.losses import retain_loss, shift_causal

    tuned = copy.deepcopy(model)
    tuned.requires_grad_(True)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=RELEARN["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    ids, mask = rows.input_ids.to(tuned.device), rows.attention_mask.to(tuned.device)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(RELEARN["seed"])
        tuned.train()
        for _ in range(RELEARN["steps"]):
            loss = retain_loss(*shift_causal(tuned(ids, attention_mask=mask).logits, ids, mask))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return tuned.eval()


class AuditProbes:
    name = "audit"

    def reference(self, memorized, forget, heldout, formats, gguf_file) -> dict:
        return {}  # the audit measures the reference itself

    def probe(self, model, memorized, forget, heldout, retain, formats, gguf_file, before) -> dict:
        from fastunlearn.evals.audit import AuditConfig, audit

        settings = {"relearn_steps": RELEARN["steps"], "relearn_lr": RELEARN["lr"], "relearn_rows": RELEARN["rows"]}
        config = AuditConfig(probes=("quantization", "relearning"), formats=tuple(formats), el_n=EL_N, **settings)
        result = audit(model, forget, heldout, reference=memorized, retain=retain, gguf=gguf_file, config=config)
        rows = result.report["quantization"]["rows"]
        for row in rows:
            row["format"] = "gguf" if row["format"].startswith("gguf") else row["format"]
        return {"backend": self.name, "quantization": {"rows": rows}, "relearning": result.report["relearning"]}
