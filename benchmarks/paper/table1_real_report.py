"""``table1_real.py``'s outputs: the cells chosen under equal forgetting, table1.md (means ± half the range over
the cells), table1.png (forget MA per epoch of every attempt; utility after / before), and the verdicts on the
paper's claims.

A cell is one (method, forget set, seed); its attempts are the lr factors tried in order. The cell's result is
its first attempt that met the criterion (the smallest lr that forgets), or, when every factor failed, its last
(reported as "never within the grid"). A cell whose attempts are not all done yet is left out.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

FAILED = math.inf  # the lr factor of a cell that never met the criterion: slower than any that did
ORDER = ("FILA + IHL", "LoRA + IHL", "LoRA + GD", "GD", "GA", "SVD init, uniform rows + IHL",
         "SVD init, rows 1 (PiSSA-like) + IHL")  # fmt: skip
SHORT = {"FILA + IHL": "FILA\n+IHL", "LoRA + IHL": "LoRA\n+IHL", "LoRA + GD": "LoRA\n+GD",
         "SVD init, uniform rows + IHL": "uniform\nrows+IHL",
         "SVD init, rows 1 (PiSSA-like) + IHL": "PiSSA-like\n+IHL"}  # the plot's bar labels  # fmt: skip


def chosen(rows: list[dict], grid: dict[str, tuple[float, ...]]) -> list[dict]:
    """One row per finished cell (``grid``: method name -> the factors it may try), with "grid_epochs": the
    epochs of every attempt up to it (the cost of finding the lr)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["forget_set"], r["seed"]), []).append(r)
    out = []
    for (method, *_), attempts in cells.items():
        attempts.sort(key=lambda r: r["lr_factor"])
        done = [r for r in attempts if r["success"]]
        if done or len(attempts) >= len(grid.get(method, ())):
            pick = done[0] if done else attempts[-1]
            spent = sum(r["epochs"] for r in attempts if r["lr_factor"] <= pick["lr_factor"])
            out.append({**pick, "grid_epochs": spent})
    return out


def spread(values: list[float], digits: int = 3) -> str:
    """mean ± half the range ("–" for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def ratio(r: dict, before: dict, key: str) -> float:
    return r["utility"][key] / before["utility"][key]


def cost(r: dict) -> tuple[float, int]:
    """(lr factor, epochs) of a cell; a cell that never forgot within the grid counts as slower than any."""
    return (r["lr_factor"], r["epochs"]) if r["success"] else (FAILED, r["epochs"])


def best_possible(attempts: list[dict]) -> tuple[float, float]:
    """The lowest cost a cell can still end with: its first success's, or, while every attempt so far failed,
    (the largest factor tried, inf): any later success is at a larger factor."""
    attempts = sorted(attempts, key=lambda r: r["lr_factor"])
    done = [r for r in attempts if r["success"]]
    return cost(done[0]) if done else (attempts[-1]["lr_factor"], math.inf)


def verdicts(picked: list[dict], before: dict, rows: list[dict] | None = None) -> dict:
    """(b): FILA + IHL reaches the criterion at a smaller lr factor, or at the same one in fewer epochs, than
    LoRA + GD and LoRA + IHL in every cell both ran (an unfinished cell of theirs counts when no success of theirs
    can beat FILA's any more: :func:`best_possible`); (c): its WikiText and Pile perplexity ratios are below GA's
    and GD's and its LAMBADA accuracy is not below theirs (means over cells)."""
    by, tried = {}, {}
    for r in picked:
        by.setdefault(r["method"], {})[(r["forget_set"], r["seed"])] = r
    for r in rows or picked:
        tried.setdefault(r["method"], {}).setdefault((r["forget_set"], r["seed"]), []).append(r)
    fila = by.get("FILA + IHL", {})
    out = {}
    for other in ("LoRA + GD", "LoRA + IHL"):
        theirs = {c: best_possible(a) for c, a in tried.get(other, {}).items()}
        shared = sorted(c for c in set(fila) & set(theirs) if c in by.get(other, {}) or cost(fila[c]) < theirs[c])
        wins = [cost(fila[c]) < theirs[c] for c in shared]
        out[f"b_fewer_epochs_than_{other}"] = {"holds": all(wins) if shared else None, "cells": len(shared),
                                              "fila_wins": sum(wins)}  # fmt: skip
    harm = {name: {"wikitext": _mean(ratio(r, before, "wikitext") for r in by.get(name, {}).values()),
                   "pile": _mean(ratio(r, before, "pile") for r in by.get(name, {}).values()),
                   "lambada_acc": _mean(r["lambada_acc"] for r in by.get(name, {}).values())}
            for name in ("FILA + IHL", "GA", "GD")}  # fmt: skip
    f = harm["FILA + IHL"]
    less = all(f["wikitext"] < harm[n]["wikitext"] and f["pile"] < harm[n]["pile"]
               and f["lambada_acc"] >= harm[n]["lambada_acc"] for n in ("GA", "GD"))  # fmt: skip
    untested = any(math.isnan(h["wikitext"]) for h in harm.values())
    out["c_less_utility_harm_than_GA_GD"] = {"holds": None if untested else less, **harm}
    return out


def attempts_markdown(rows: list[dict]) -> list[str]:
    """Every attempt (cells still open included): method, cell, lr factor, outcome, epochs, forget MA per epoch."""
    lines = ["## Every attempt", "", "| Method | forget set, seed | lr factor | outcome | epochs | forget MA per epoch "
             "| minutes |", "|" + " --- |" * 7]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["forget_set"], r["seed"], r["method"], r["lr_factor"])):
        curve, outcome = " ".join(f"{m:.2f}" for m in r["curve"]), "met" if r["success"] else "not met"
        lines.append(f"| {r['method']} | {r['forget_set']}, {r['seed']} | ×{r['lr_factor']:g} | {outcome} | "
                     f"{r['epochs']} | {curve} | {r['seconds'] / 60:.1f} |")  # fmt: skip
    return lines + [""]


def table_markdown(picked: list[dict], before: dict, caption: str, finished: bool, rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["method"] for r in picked))
    head = "" if finished else "**PARTIAL: the run did not finish; rows below are the cells that did.**\n\n"
    ma_b = [r["ma_before"] for r in picked]
    el_b = [r["el_before"] for r in picked]
    crit = picked[0]["criterion"] if picked else {"ma": math.nan, "el": math.nan}
    u = before["utility"]
    lines = [
        "# Table 1 on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "", head + caption, "",
        "| Method | cells | lr factor | Params % | Epochs to criterion | Epochs over the grid | MA | EL_10 "
        "| WikiText PPL (ratio) | Pile PPL (ratio) | LAMBADA acc |", "|" + " --- |" * 11,
        f"| Before (memorized) | – | – | – | – | – | {spread(ma_b)} | {spread(el_b)} | {u['wikitext']:.1f} (1) | "
        f"{u['pile']:.1f} (1) | {before['lambada_acc']:.3f} |",
        f"| Held-out TDEC (criterion) | – | – | – | – | – | ≤ {crit['ma']:.3f} | ≤ {crit['el']:.4f} | | | |",
    ]  # fmt: skip
    if "pretrained" in before:  # SmolLM2 as released, before the memorization fine-tune
        p = before["pretrained"]
        ppl = [f"{p['utility'][k]:.1f} ({ratio(p, before, k):.2f})" for k in ("wikitext", "pile")]
        lines.append(f"| SmolLM2 as released (not memorized) | – | – | – | – | – | | | {ppl[0]} | {ppl[1]} | "
                     f"{p['lambada_acc']:.3f} |")  # fmt: skip
    for name in names:
        rs = [r for r in picked if r["method"] == name]
        ok = [r for r in rs if r["success"]]
        never = len(rs) - len(ok)
        epochs = spread([r["epochs"] for r in ok], 1) if ok else "never"
        epochs += f" ({never} of {len(rs)} never within the grid)" if ok and never else ""
        factors = "/".join(f"×{f:g}" for f in sorted({r["lr_factor"] for r in ok})) or "–"
        ppl = {k: f"{_mean(r['utility'][k] for r in rs):.1f} ({spread([ratio(r, before, k) for r in rs], 2)})"
               for k in ("wikitext", "pile")}  # fmt: skip
        lines.append(
            f"| {name} | {len(rs)} | {factors} | {rs[0]['params_percent']:.2f} | {epochs} | "
            f"{spread([r['grid_epochs'] for r in rs], 1)} | {spread([r['ma'] for r in rs])} | "
            f"{spread([r['el'] for r in rs], 4)} | {ppl['wikitext']} | {ppl['pile']} | "
            f"{spread([r['lambada_acc'] for r in rs])} |"
        )
    lines += ["", "Values: mean ± half the range over the cells (forget set, seed). lr factor: × the paper's lr (5e-5 "
              "full, 2e-4 adapters), the smallest of the grid that met the criterion. Epochs over the grid: every "
              "epoch spent up to that lr (failed attempts run to the epoch limit). PPL ratio = after / before.",
              "", "## Verdicts", ""]  # fmt: skip
    for key, v in verdicts(picked, before, rows).items():
        verdict = (
            "not tested (a method has no finished cell)"
            if v["holds"] is None
            else ("holds" if v["holds"] else "does not hold")
        )
        lines.append(f"- {key}: **{verdict}** — "
                     + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if k != "holds"))  # fmt: skip
    lines += [
        "",
        *attempts_markdown(rows),
        "## Greedy continuation of each forget set's first sequence (32-token prefix, 24 new tokens)",
        "",
    ]
    for forget_set, c in before["continuations"].items():
        lines += [f"- {forget_set} truth: `{c['truth']!r}`", f"  - before: `{c['greedy']!r}`"]
        for r in picked:
            if r["forget_set"] == forget_set:
                lines.append(f"  - {r['method']} (seed {r['seed']}): `{r['continuation']['greedy']!r}`")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k} {_fmt(v)}" for k, v in x.items()) + "}"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_plot(path: Path, rows: list[dict], picked: list[dict], before: dict) -> None:
    """One panel per cell: forget MA per epoch of every attempt (its lr factor in the label), the criterion
    dashed; the last panel: WikiText / Pile perplexity after / before per method (mean over finished cells)."""
    from matplotlib.figure import Figure

    from fastunlearn.engine.report import atomic_write

    if not rows:
        return
    cells = sorted(dict.fromkeys((r["forget_set"], r["seed"]) for r in rows))
    ncols = min(3, len(cells) + 1)
    nrows = -(-(len(cells) + 1) // ncols)
    fig = Figure(figsize=(5 * ncols, 4.5 * nrows))
    panels = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in panels[len(cells) + 1 :]:
        ax.set_axis_off()
    axes = panels[: len(cells) + 1]  # one per cell, then the utility panel
    colors = {name: f"C{i}" for i, name in enumerate(ORDER)}
    for ax, cell in zip(axes, cells):
        for r in rows:
            if (r["forget_set"], r["seed"]) == cell:
                color = colors.setdefault(r["method"], f"C{len(colors) % 10}")
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", ms=3, color=color,
                        ls="-" if r["success"] else ":", label=f"{r['method']} ×{r['lr_factor']:g}")  # fmt: skip
        ax.axhline(rows[0]["criterion"]["ma"], color="k", ls="--", lw=1, label="held-out MA (criterion)")
        ax.set(xlabel="epoch (dotted: criterion not met)", ylabel="forget MA", title=f"{cell[0]}, seed {cell[1]}")
        ax.legend(fontsize=6)
    names = sorted(dict.fromkeys(r["method"] for r in picked), key=lambda n: ORDER.index(n) if n in ORDER else 99)
    for key, offset in (("wikitext", -0.2), ("pile", 0.2)):
        means = [_mean(ratio(r, before, key) for r in picked if r["method"] == n) for n in names]
        axes[-1].bar([i + offset for i in range(len(names))], means, width=0.4, label=key)
    axes[-1].axhline(1.0, color="k", lw=1, label="memorized model")
    if "pretrained" in before:
        axes[-1].axhline(ratio(before["pretrained"], before, "wikitext"), color="C0", ls=":", lw=1,
                         label="SmolLM2 as released (wikitext)")  # fmt: skip
        axes[-1].axhline(ratio(before["pretrained"], before, "pile"), color="C1", ls=":", lw=1,
                         label="SmolLM2 as released (pile)")  # fmt: skip
    axes[-1].set_xticks(range(len(names)), [SHORT.get(n, n) for n in names], fontsize=7)
    axes[-1].set(ylabel="perplexity after / before", title="utility at the criterion (finished cells)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


def write_outputs(args, rows: list[dict], before: dict, finished: bool, grid: dict, caption: str) -> list[dict]:
    from fastunlearn.engine.report import atomic_write

    picked = chosen(rows, grid)
    atomic_write(Path(args.out) / "table1.md", table_markdown(picked, before, caption, finished, rows))
    write_plot(Path(args.out) / "table1.png", rows, picked, before)
    return picked
