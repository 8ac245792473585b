"""A criterion that survives deployment (``UnlearnConfig.deploy_quant``) and quantization-aware unlearning
(``UnlearnConfig.quant_aware``).

The engine certifies forgetting on the weights it trains (float32 / bf16). A model is often shipped quantized
(a GGUF file in Q4_1, Q8_0, ...), and a model that arrived quantized has its base weights on the format's grid:
re-quantizing the unlearned model snaps small updates back onto the old values and the forgotten text returns
(Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025).

**deploy_quant** (a format of ``fastunlearn.ops.quant``, or "gguf": the tensor types of ``gguf_template``): the
stop rule ALSO measures the forget set's MA and EL_n on the deployed model (adapters merged, every weight
matrix round-tripped; ``engine.quantized``), and compares them with the held-out set's values on the ORIGINAL
model deployed the same way (measured once at the baseline and cached like the float held-out baseline; with
stop="threshold" the same fixed limits). An epoch meets the criterion only when both the float and the deployed
model meet it; a run succeeds only so.

**When it is measured**: at the epochs whose float values meet the float criterion, and after each task (then
for every forget set so far and the held-out set's MA). An epoch that misses the float criterion fails whatever
the deployed model does, so measuring it there could not change a decision; quantizing costs a pass over every
weight (SmolLM2-135M on one CPU thread: about 1 s in Q4_1 / Q8_0, 5 s in NF4, 50 s in Q4_K) besides the
forward passes. stop="epochs" has no criterion: the deployed model is measured after each task only.

**quant_aware** (the same choices): every epoch's forward and backward run at the deployed weights with the
straight-through estimator (``DeployWeights.straight_through``): the loss, forget term included, is that of the
quantized model, and the update must move the weights across quantization buckets to lower it. It costs one
quantization per epoch and changes the trained model; see docs/engine.md for what it buys.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Iterator

from torch import nn

from fastunlearn import gguf_io
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine import evaluation
from fastunlearn.engine.cache import HeldoutCache
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.inputs import set_name
from fastunlearn.engine.progress import info
from fastunlearn.engine.quantized import DeployWeights
from fastunlearn.engine.runlog import BaselineCache, DeployLog


def plan(model: nn.Module, fmt: str, cfg: UnlearnConfig) -> DeployWeights | None:
    """The weights ``fmt`` ("none", a quant format or "gguf") quantizes in ``model`` (before adapters); None for
    "none". ValueError naming the weight or the template file that does not fit, before any compute."""
    if fmt == "none":
        return None
    formats = gguf_io.formats_like(model, cfg.gguf_template) if fmt == "gguf" else fmt
    return DeployWeights.of(model, formats)


def setup(model: nn.Module, cfg: UnlearnConfig) -> tuple[DeployCheck | None, DeployWeights | None]:
    """(the deployed criterion's check or None, the quant_aware weights or None) of a run, planned on ``model``
    before adapters are injected."""
    weights = plan(model, cfg.deploy_quant, cfg)
    aware = weights if cfg.quant_aware == cfg.deploy_quant else plan(model, cfg.quant_aware, cfg)
    return (None if weights is None else DeployCheck(weights, cfg)), aware


def check_template(model: nn.Module, cfg: UnlearnConfig) -> None:
    """With ``gguf_template`` and ``write_gguf``: the model can be written like the template (every weight has
    its tensor, shapes agree, the types are writable); ValueError naming the file otherwise."""
    if cfg.gguf_template is not None and cfg.write_gguf:
        gguf_io.formats_like(model, cfg.gguf_template)


def quant_aware_weights(weights: DeployWeights | None, model: nn.Module):
    """What each update's forward / backward run in (``train_epoch``'s ``weights``): a factory of straight-through
    quantized-weight contexts, or None."""
    return None if weights is None else functools.partial(weights.straight_through, model)


class DeployCheck:
    """The deployed half of the stop rule for one run: ``baseline`` (once), ``epoch`` (after each update),
    ``after_task``; each quantizes the model, measures, and restores it exactly."""

    def __init__(self, weights: DeployWeights, cfg: UnlearnConfig) -> None:
        self.weights, self.cfg = weights, cfg
        self.name = cfg.deploy_quant.upper()
        self.limits: dict | None = None  # {"stop", "ma", "el"} for the deployed model, set by the baseline

    def cache_variant(self) -> str:
        """The held-out cache's key for the deployed values: the format of every weight."""
        formats = json.dumps(sorted(self.weights.formats.items()) + sorted(self.weights.transposed))
        return "deployed:" + hashlib.sha256(formats.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def _deployed(self, model: nn.Module) -> Iterator[nn.Module]:
        with self.weights.deployed(model):
            yield model

    def baseline(self, model: nn.Module, tasks: list[SequenceSet], heldout: SequenceSet | None,
                 cache: HeldoutCache | None) -> DeployLog:  # fmt: skip
        """The original model deployed: every forget set's MA / EL_n and the held-out set's (from ``cache`` when
        it holds them); the deployed criterion's limits."""
        cfg, start = self.cfg, time.perf_counter()
        held = cache.load() if cache is not None else None
        from_cache = held is not None
        held_text = "" if heldout is None else f" and the held-out set{' (from the cache)' if from_cache else ''}"
        info("baseline (%s deployed): MA and EL_%d of %d forget set(s)%s", self.name, cfg.el_n, len(tasks), held_text)
        with self._deployed(model):
            forget = [evaluation.measure(model, t, cfg, phase=f"baseline ({self.name}): {set_name(k, len(tasks))}")
                      for k, t in enumerate(tasks)]  # fmt: skip
            if heldout is not None and held is None:
                held = evaluation.measure(model, heldout, cfg, phase=f"baseline ({self.name}): held-out set")
                if cache is not None:
                    cache.store(held, len(heldout))
        limits = {"ma": cfg.ma_threshold, "el": cfg.el_threshold}  # "epochs": None, None
        if cfg.stop == "heldout":
            limits = held
        self.limits = {"stop": cfg.stop, "ma": limits["ma"], "el": limits["el"]}
        source = None if cache is None else BaselineCache(hit=from_cache, file=str(cache.path))
        return DeployLog(format=cfg.deploy_quant, weights=self.weights.describe(), criterion=self.limits,
                         forget=forget, heldout=held, baseline_cache=source,
                         seconds=time.perf_counter() - start)  # fmt: skip

    def epoch(self, model: nn.Module, forget: SequenceSet, float_met: bool | None, phase: str) -> dict | None:
        """{"ma", "el", "met"} of the deployed model after an epoch whose float values met the float
        criterion (``float_met``); None otherwise (it could not change the decision) or with stop="epochs"."""
        if not float_met:
            return None
        with self._deployed(model):
            metrics = evaluation.measure(model, forget, self.cfg, limit=self.limits["ma"],
                                         phase=f"{phase} ({self.name} deployed)")  # fmt: skip
        return {**metrics, "met": evaluation.criterion_met(metrics, self.limits)}

    def after_task(self, model: nn.Module, sets: list[SequenceSet], heldout: SequenceSet | None, last: dict | None,
                   phase: str) -> dict:  # fmt: skip
        """{"forget": [{"ma", "el", "met"} per forget set so far], "heldout": {"ma", "el"} or None} of the deployed
        model once a task stopped; ``last``: the task's last epoch's deployed values (reused when complete)."""
        cfg, n = self.cfg, len(sets)
        reuse = last is not None and last["el"] is not None
        with self._deployed(model):
            forget = [evaluation.measure(model, t, cfg, phase=f"{phase} ({self.name}): {set_name(i, n)}")
                      for i, t in enumerate(sets[: n - 1 if reuse else n])]  # fmt: skip
            held = None
            if heldout is not None:
                held = evaluation.measure(model, heldout, cfg, el=cfg.eval_heldout_el_after,
                                          phase=f"{phase} ({self.name}): held-out set")  # fmt: skip
        if reuse:
            forget.append({"ma": last["ma"], "el": last["el"]})
        return {"forget": [{**m, "met": evaluation.criterion_met(m, self.limits)} for m in forget], "heldout": held}
