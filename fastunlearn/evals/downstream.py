"""Downstream utility with lm-evaluation-harness: does the unlearned model still reason as well as before?

Cha et al. (arXiv 2408.06621), following Jang et al. (2023), check that unlearning keeps a model's general
abilities on nine zero-shot reasoning tasks; ``PAPER_TASKS`` names them as lm-eval tasks (LAMBADA is
``lambada_openai``, the OpenAI-preprocessed test set lm-eval reports for GPT-Neo models).

:func:`evaluate_downstream` wraps the in-memory model and its tokenizer in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` (tasks' default few-shot counts, which are 0 for ``PAPER_TASKS``; standard errors
as lm-eval computes them). ``include_path`` adds directories of task YAMLs to lm-eval's registry, e.g. a task
on local data: ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``. The
``datasets`` library resolves a relative ``data_files`` path against the current directory, not the YAML's,
so use absolute paths. The model is put in eval mode for the run and back in its previous mode afterwards;
lm-eval gets a copy of the tokenizer.

**Data that cannot be loaded.** lm-eval loads each task's data when the task is built. Without network and
without a cached copy ``datasets`` raises ``ConnectionError`` ("Couldn't reach 'Rowan/hellaswag' on the
Hub"; at once with ``HF_HUB_OFFLINE=1``, after about 25 s of retries without it); a dataset missing from the
Hub, a gated one, or a local ``data_files`` path that does not exist raise ``FileNotFoundError`` (or its
``datasets`` subclasses). Such a task is skipped: the others run, and the result lists it in ``unavailable``
with the reason (also a warning). If no task can load its data, ``FileNotFoundError`` says why for each.
A Hub dataset that only a loading script can build (``datasets`` >= 4 runs none: "Dataset scripts are no
longer supported") is reported the same way. Any other error (a broken task definition, a dataset format
``datasets`` cannot read) propagates.
To make a task available offline, run it once with network access (``datasets`` caches the data and
``HF_DATASETS_OFFLINE=1`` then reads the cache) or define it on a local copy of its data under
``include_path``.

lm-eval is an optional dependency (``pip install "fastunlearn[lm-eval]"``), imported when called.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastunlearn.utils.validate import is_int

PAPER_TASKS = (
    "lambada_openai", "hellaswag", "winogrande", "copa", "arc_easy", "arc_challenge", "piqa", "mathqa", "pubmedqa",
)  # fmt: skip
INSTALL_HINT = 'downstream evaluation needs lm-evaluation-harness: pip install "fastunlearn[lm-eval]"'
DATA_HINT = (
    "To make a task available, run it once with network access (the datasets cache keeps the data; "
    "HF_DATASETS_OFFLINE=1 then reads it from there), or define the task on a local copy of its data in a YAML "
    "under include_path (dataset_path: json, data_files: absolute paths)"
)
DATA_ERRORS = (ConnectionError, FileNotFoundError)  # what `datasets` raises for data it cannot get (see above)
SCRIPT_DATASET = "Dataset scripts are no longer supported"  # datasets >= 4 on a Hub dataset with a loading script


def _number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"  # a broken model's perplexity can be 1e9


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None  # None where lm-eval reports none ("N/A")
    higher_is_better: bool | None = None


@dataclass
class DownstreamResult:
    """``metrics[task][name]``: lm-eval's metrics per task (and per group, for a group), named as lm-eval
    names them without the default filter ("acc", "acc_norm", "perplexity"; "exact_match,strict-match").
    ``n_samples[task]``: examples scored (after ``limit``). ``unavailable[task]``: why it could not run."""

    metrics: dict[str, dict[str, Metric]]
    n_samples: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """A table with one row per task and metric (↑ / ↓: higher / lower is better), then unavailable tasks."""
        lines = ["| task | metric | value | stderr | samples |", "|---|---|---:|---:|---:|"]
        for task, metrics in self.metrics.items():
            n = self.n_samples.get(task, "–")
            for name, m in metrics.items():
                arrow = {True: " ↑", False: " ↓", None: ""}[m.higher_is_better]
                stderr = "–" if m.stderr is None else _number(m.stderr)
                lines.append(f"| {task} | {name}{arrow} | {_number(m.value)} | {stderr} | {n} |")
        if self.unavailable:
            lines += ["", "Not run, data unavailable:"]
            lines += [f"- {task}: {reason}" for task, reason in self.unavailable.items()]
            lines += ["", DATA_HINT + "."]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"metrics": {task: {name: {value, stderr, higher_is_better}}}, "n_samples", ...}``."""
        metrics = {task: {name: vars(m) for name, m in ms.items()} for task, ms in self.metrics.items()}
        return {"metrics": metrics, "n_samples": dict(self.n_samples), "unavailable": dict(self.unavailable)}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return lm_eval, TaskManager


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str | None, yaml_files: tuple):
    """``yaml_files`` ((path, mtime) of the YAMLs under ``include_path``) only keys the cache."""
    _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=include_path)


def _task_manager(include_path: str | os.PathLike | None):
    """lm-eval's task index (about 5 s to build: it parses every task YAML it ships), built again only when
    the YAML files under ``include_path`` change (added, removed or modified). lm-eval reads a task's YAML
    again whenever it builds the task, so a cached index never runs an old definition."""
    _import_lm_eval()
    if include_path is None:
        return _cached_manager(None, ())
    if not os.path.isdir(include_path):
        raise ValueError(f"include_path must be a directory of lm-eval task YAMLs, got {str(include_path)!r}")
    root = Path(include_path).resolve()
    yaml_files = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.glob("**/*.yaml")))
    return _cached_manager(str(root), yaml_files)


def _check_task_list(tasks: Sequence[str]) -> None:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty sequence of lm-eval task names, got {tasks!r}")


def _check_names(manager, tasks: Sequence[str]) -> list[str]:
    """``tasks`` without repeats; ValueError naming those lm-eval does not know."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (not in lm-eval's registry nor under include_path; "
            "`lm-eval ls tasks` lists them)"
        )
    return list(dict.fromkeys(tasks))


def check_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> None:
    """Raise before loading a model, not after: ImportError without lm-eval, ValueError for unknown task
    names (or an ``include_path`` that is not a directory)."""
    _check_task_list(tasks)
    _check_names(_task_manager(include_path), tasks)


def _load(manager, name: str) -> list:
    """The task, group or tagged tasks ``name`` stands for, built (their data loaded)."""
    loaded = manager.load([name])
    groups = loaded.get("groups") or {}
    return [groups[name]] if name in groups else list(loaded["tasks"].values())


def _check_options(limit, batch_size, num_fewshot) -> None:
    if limit is not None and not (is_int(limit, 1) or isinstance(limit, float) and 0 < limit < 1):
        raise ValueError(f"limit must be None, an int >= 1 (examples per task) or a fraction in (0, 1), got {limit!r}")
    if not is_int(batch_size, 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_fewshot is not None and not is_int(num_fewshot, 0):
        raise ValueError(f"num_fewshot must be None (the tasks' defaults) or an int >= 0, got {num_fewshot!r}")


def _metrics(scores: dict, higher: dict) -> dict[str, Metric]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": Metric(v, s)}``."""
    out = {}
    for key, value in scores.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = scores.get(f"{metric}_stderr,{filt}")
        stderr = float(stderr) if isinstance(stderr, (int, float)) else None
        out[metric if filt == "none" else key] = Metric(float(value), stderr, higher.get(metric))
    return out


def evaluate_downstream(
    model,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> DownstreamResult:
    """Run lm-eval ``tasks`` (registry names: tasks, groups or tags) on ``model`` (a transformers causal LM,
    on the device it is on) with ``tokenizer``. ``limit``: examples per task (an int) or a fraction of each
    (a float < 1), as lm-eval's ``--limit``; for quick checks, not for reported numbers. ``num_fewshot``:
    None keeps each task's default. Tasks whose data cannot be loaded are reported in ``unavailable`` (see the
    module docstring); raises ``FileNotFoundError`` if none can, ``ValueError`` for unknown task names."""
    lm_eval, _ = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    _check_task_list(tasks)
    _check_options(limit, batch_size, num_fewshot)
    if tokenizer is None:
        raise ValueError("tokenizer must be the model's tokenizer, got None")
    manager = _task_manager(include_path)
    built, unavailable = [], {}
    for name in _check_names(manager, tasks):
        try:
            built += _load(manager, name)
        except DATA_ERRORS as exc:
            unavailable[name] = f"{type(exc).__name__}: {exc}"
        except RuntimeError as exc:  # a dataset that only a loading script can build: a local copy works
            if SCRIPT_DATASET not in str(exc):
                raise
            unavailable[name] = f"{exc} (this datasets version runs no loading scripts)"
    if not built:
        reasons = "; ".join(f"{task} ({reason})" for task, reason in unavailable.items())
        raise FileNotFoundError(f"no lm-eval task could load its data: {reasons}. {DATA_HINT}.")
    for task, reason in unavailable.items():
        warnings.warn(f"lm-eval task {task} not run, its data is unavailable: {reason}", stacklevel=2)
    training = model.training
    try:
        # HFLM sets a pad token on a tokenizer that has none: a copy leaves the caller's as it is
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            lm, tasks=built, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
        )
    finally:
        model.train(training)
    higher = out["higher_is_better"]
    return DownstreamResult(
        metrics={task: _metrics(scores, higher.get(task, {})) for task, scores in out["results"].items()},
        n_samples={task: n["effective"] for task, n in out["n-samples"].items()},
        unavailable=unavailable,
    )
