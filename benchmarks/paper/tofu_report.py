"""The outputs of ``tofu.py`` from its runs.jsonl records: tofu.md (the table) and tofu.png (model utility vs forget
quality per epoch, one trajectory per method, as the TOFU figures of Cha et al. and Maini et al. draw them)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from fastunlearn.utils.atomic import atomic_write

ORDER = ("GA", "GD", "LoRA + GD", "LoRA + IHL", "FILA + IHL")


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def latest(runs: list[dict]) -> dict[str, list[dict]]:
    """{split: that split's runs, the last record per method and learning rate, in ORDER, then by lr}; each gets
    a "label": the method, with its lr when the split ran the method at several."""
    by_split: dict[str, dict[tuple, dict]] = {}
    for run in runs:
        by_split.setdefault(run["split"], {})[run["method"], run["lr"]] = run
    rank = {name: i for i, name in enumerate(ORDER)}
    out = {}
    for split, found in by_split.items():
        rows = sorted(found.values(), key=lambda r: (rank.get(r["method"], len(ORDER)), r["lr"]))
        for run in rows:
            several = sum(r["method"] == run["method"] for r in rows) > 1
            run["label"] = f"{run['method']}, lr {run['lr']:g}" if several else run["method"]
        out[split] = rows
    return out


def table(runs: list[dict]) -> str:
    lines = ["# TOFU on SmolLM2-135M-Instruct (fastunlearn benchmarks/paper/tofu.py)", ""]
    for split, rows in latest(runs).items():
        head = rows[0]
        sizes, settings = head["sizes"], head["settings"]
        lines += [
            f"## {split}: forget {sizes['forget']} pairs, retain {sizes['retain']} pairs",
            "",
            f"Target model: fine-tuned {settings['ft_epochs']} epochs (lr {settings['ft_lr']:g}, "
            f"{settings['ft_batch']} rows per update, {settings['template']} prompt) on forget + retain pairs; "
            "retain model: the same on the retain pairs only."
            f" Evaluation questions per set: {sizes['eval']}.",
            "",
            "| model | trainable | lr | forget quality | model utility | forget prob. | forget ROUGE-L | forget MA | "
            "unlearning s | evaluation s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, key in (("retain model (reference)", "retain_model"), ("target model", "target_model")):
            values = head[key]
            lines.append(f"| {name} | – | – | {_f(values['forget_quality'])} | {_f(values['model_utility'])} | "
                         f"{_f(values.get('forget_probability'))} | {_f(values.get('forget_rouge_l'))} | "
                         "– | – | – |")  # fmt: skip
        for run in rows:
            last = run["trajectory"][-1]
            lines.append(
                f"| {run['label']} (epoch {last['epoch']}) | {run['trainable_percent']:.2f}% | {run['lr']:g} | "
                f"{_f(last.get('forget_quality'))} | {_f(last.get('model_utility'))} | "
                f"{_f(last.get('forget_probability'))} | {_f(last.get('forget_rouge_l'))} | "
                f"{_f(last.get('forget_ma'), 3)} | {run['train_s']:.0f} | {run['hook_s']:.0f} |"
            )
        lines += ["", "Per epoch (forget quality / model utility):", "",
                  "| method | " + " | ".join(f"epoch {p['epoch']}" for p in rows[0]["trajectory"]) + " |",
                  "| --- |" + " --- |" * len(rows[0]["trajectory"])]  # fmt: skip
        for run in rows:
            cells = [f"{_f(p.get('forget_quality'), 3)} / {_f(p.get('model_utility'), 3)}" for p in run["trajectory"]]
            lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    splits = latest(runs)
    fig = Figure(figsize=(6.5 * len(splits), 5), layout="constrained")
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, (split, rows) in zip(axes, splits.items()):
        head = rows[0]
        for run in rows:
            points = [(p["forget_quality"], p["model_utility"]) for p in run["trajectory"]
                      if p.get("forget_quality") and p.get("model_utility") is not None]  # fmt: skip
            if points:
                (line,) = ax.plot(*zip(*points), "o-", ms=4, label=run["label"])
                ax.plot(*points[-1], "o", ms=8, color=line.get_color())  # the last epoch
        target = head["target_model"]
        if target["forget_quality"]:
            ax.plot(target["forget_quality"], target["model_utility"], "k*", ms=12, label="target model (epoch 0)")
        ax.axhline(head["retain_model"]["model_utility"], color="grey", ls=":", label="retain model's utility")
        ax.axvline(0.05, color="tab:red", ls=":", lw=0.8, label="p = 0.05")
        ax.set_xscale("log")
        ax.set(xlabel="forget quality (KS p-value vs the retain model, log)", ylabel="model utility",
               title=f"TOFU {split}: {head['sizes']['forget']} forget pairs, SmolLM2-135M\n"
               "(big dot: last epoch)")  # fmt: skip
        ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def write_outputs(out: Path, runs: list[dict]) -> None:
    """tofu.md and tofu.png in ``out`` (nothing when no run finished)."""
    if not runs:
        return
    atomic_write(out / "tofu.md", table(runs))
    plot(runs, out / "tofu.png")
