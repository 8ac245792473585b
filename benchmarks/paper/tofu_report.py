"""The outputs of ``tofu.py`` from its runs.jsonl records: tofu.md (the setting, the final epoch of every run, and
a table per epoch) and tofu.png (the paper's Figure 5: model utility against forget quality, one curve per method
and rank, markers growing with the epoch, the target model's square and the retain model's star)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from fastunlearn.utils.atomic import atomic_write

ORDER = ("GA", "GD", "IHL", "FILA + IHL", "NPO")
COLORS = {"GA": "tab:red", "GD": "tab:orange", "IHL": "tab:blue", "FILA + IHL": "tab:green", "NPO": "tab:purple"}


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}f}"


def latest(runs: list[dict]) -> list[dict]:
    """The last record of each (method, rank, lr), ordered by rank, then ORDER, then lr."""
    found: dict[tuple, dict] = {}
    for run in runs:
        found[run["method"], run["rank"], run["lr"]] = run
    position = {name: i for i, name in enumerate(ORDER)}
    return sorted(found.values(), key=lambda r: (r["rank"], position.get(r["method"], len(ORDER)), r["lr"]))


def label(run: dict, runs: list[dict]) -> str:
    several = len({r["lr"] for r in runs if (r["method"], r["rank"]) == (run["method"], run["rank"])}) > 1
    return f"{run['method']} r{run['rank']}" + (f", lr {run['lr']:g}" if several else "")


def setting(head: dict) -> list[str]:
    sizes, s, e = head["sizes"], head["settings"], head["eval_settings"]
    return [
        f"Forget: {s['split']} ({sizes['forget']} pairs); retain: {sizes['retain']} pairs "
        f"({s['retain_authors'] or 'all'} authors). Target model: SmolLM2-135M-Instruct fine-tuned {s['ft_epochs']} "
        f"epochs (lr {s['ft_lr']:g}, {s['ft_batch']} pairs per update) on forget + retain; retain model: the same on "
        f"the retain pairs only. Prompt format {s['template']}.",
        "",
        f"Evaluation (TOFU's): the first {e['max_questions']} questions of each set ({sizes['eval']}), greedy "
        f"answers until eos or prompt + answer = {e['max_length']} tokens, the model in {e['eval_dtype']} with its "
        "adapters merged. Forget quality: KS p-value of the forget-set truth ratios against the retain model's.",
    ]


def table(runs: list[dict]) -> str:
    rows = latest(runs)
    head = rows[0]
    lines = ["# TOFU on SmolLM2-135M-Instruct (fastunlearn benchmarks/paper/tofu.py)", "", *setting(head), ""]
    lines += [
        "| model | trainable | lr | epoch | forget quality | model utility | forget prob. | forget ROUGE-L | "
        "retain ROUGE-L | real-authors ROUGE-L | world-facts ROUGE-L | unlearning s | evaluation s |",
        "| --- |" + " --- |" * 12,
    ]
    for name, key in (("retain model (reference)", "retain_model"), ("target model", "target_model")):
        v = head[key]
        lines.append(f"| {name} | – | – | – | {_f(v['forget_quality'])} | {_f(v['model_utility'])} | "
                     f"{_f(v.get('forget_probability'))} | {_f(v.get('forget_rouge_l'))} | "
                     f"{_f(v.get('retain_rouge_l'))} | {_f(v.get('real_authors_rouge_l'))} | "
                     f"{_f(v.get('world_facts_rouge_l'))} | – | – |")  # fmt: skip
    for run in rows:
        last = run["trajectory"][-1]
        lines.append(
            f"| {label(run, rows)} | {run['trainable_percent']:.2f}% | {run['lr']:g} | {last['epoch']} | "
            f"{_f(last.get('forget_quality'))} | {_f(last.get('model_utility'))} | "
            f"{_f(last.get('forget_probability'))} | {_f(last.get('forget_rouge_l'))} | "
            f"{_f(last.get('retain_rouge_l'))} | {_f(last.get('real_authors_rouge_l'))} | "
            f"{_f(last.get('world_facts_rouge_l'))} | {run['train_s']:.0f} | {run['hook_s']:.0f} |"
        )
    epochs = max(len(r["trajectory"]) for r in rows)
    lines += ["", "Per epoch, forget quality / model utility (epoch 0: the target model):", "",
              "| run | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " |",
              "| --- |" + " --- |" * epochs]  # fmt: skip
    for run in rows:
        cells = [f"{_f(p.get('forget_quality'), 3)} / {_f(p.get('model_utility'), 3)}" for p in run["trajectory"]]
        lines.append(f"| {label(run, rows)} | " + " | ".join(cells + [""] * (epochs - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """One panel per rank; per run a curve through its epochs (marker area growing with the epoch); one legend
    for the figure, naming every method that ran at any rank."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = latest(runs)
    ranks = sorted({r["rank"] for r in rows})
    fig = Figure(figsize=(4.2 * len(ranks) + 1.4, 4.4), layout="constrained")
    axes = fig.subplots(1, len(ranks), squeeze=False, sharex=True, sharey=True)[0]
    head = rows[0]
    target, retain = head["target_model"], head["retain_model"]
    for ax, rank in zip(axes, ranks):
        for run in (r for r in rows if r["rank"] == rank):
            points = [(p["epoch"], p.get("forget_quality"), p.get("model_utility")) for p in run["trajectory"]]
            points = [(e, q, u) for e, q, u in points if q and u is not None]
            if not points:
                continue
            color = COLORS.get(run["method"])
            ax.plot([q for _, q, _ in points], [u for _, _, u in points], "-", color=color, lw=1, alpha=0.8)
            ax.scatter([q for _, q, _ in points], [u for _, _, u in points], s=[12 + 14 * e for e, _, _ in points],
                       color=color, zorder=3)  # fmt: skip
        if target.get("forget_quality"):
            ax.plot(target["forget_quality"], target["model_utility"], "ks", ms=9, zorder=4)
        ax.plot(1.0, retain["model_utility"], "k*", ms=13, zorder=4)
        ax.axvline(0.05, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="forget quality (KS p-value, log)", title=f"rank {rank}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("model utility")
    ran = sorted({r["method"] for r in rows}, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    handles = [Line2D([], [], color=COLORS.get(m), marker="o", lw=1, label=m) for m in ran]
    handles += [Line2D([], [], color="k", marker="s", ms=8, ls="", label="target model"),
                Line2D([], [], color="k", marker="*", ms=11, ls="", label="retain model")]  # fmt: skip
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    sizes = head["sizes"]
    fig.suptitle(f"TOFU {head['split']} subset: {sizes['forget']} forget / {sizes['retain']} retain pairs\n"
                 "SmolLM2-135M-Instruct; marker size: epoch", fontsize="medium")  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def write_outputs(out: Path, runs: list[dict]) -> None:
    """tofu.md and tofu.png in ``out`` (nothing when no run finished)."""
    if not runs:
        return
    atomic_write(out / "tofu.md", table(runs))
    plot(runs, out / "tofu.png")
