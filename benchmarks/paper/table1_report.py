"""Table 1's outputs (``table1.py``): means over the forget sets, verdicts against the targets, the Markdown
table with its caption, the plot, and the JSON record."""

from __future__ import annotations

import io
import platform
from dataclasses import asdict
from pathlib import Path

from table1_config import TABLE_METRICS, Data, Scale


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def aggregate(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        failed = sum(not r["success"] for r in runs)
        factors = sorted({r["lr_factor"] for r in runs})
        rows.append({
            "method": name, "lr": sorted({r["lr"] for r in runs}),
            "lr_factor": factors if factors != [1.0] else None,
            "params_percent": _mean(r["params_percent"] for r in runs),
            "epochs": _mean(r["epochs"] for r in runs) if not failed else None, "failed": failed, "runs": len(runs),
            **{k: _mean(r[k] for r in runs) for k in TABLE_METRICS},
        })  # fmt: skip
    return rows


def verdicts(rows: list[dict], before: dict, max_epochs: int) -> dict:
    """The issue's targets: FILA+IHL reaches the criterion in fewer epochs than LoRA+GD, and its retain perplexity
    moves less than GA's and GD's: |relative change| from the memorized model's (stored signed), means over the
    forget sets."""
    by = {r["method"]: r for r in rows}

    def epochs(name: str) -> float:  # a failure counts as more than max_epochs
        return max_epochs + 1 if by[name]["epochs"] is None else by[name]["epochs"]

    def change(name: str) -> float:
        return by[name]["retain_ppl"] / before["retain_ppl"] - 1

    fila, lora_gd = epochs("FILA + IHL"), epochs("LoRA + GD")
    return {
        "fila_fewer_epochs_than_lora_gd": {
            "holds": fila < lora_gd,
            "fila_ihl": fila,
            "lora_gd": lora_gd,
            "failure_counts_as": max_epochs + 1,
        },
        "fila_retain_ppl_moves_less_than_ga_and_gd": {
            "holds": abs(change("FILA + IHL")) < min(abs(change("GA")), abs(change("GD"))),
            **{name: change(name) for name in ("FILA + IHL", "GA", "GD")},
        },
    }


def table_markdown(rows: list[dict], before: dict, caption: str, verdict: dict) -> str:
    head = ("| Method | Params % | Epochs | EL_10 (%) | MA (%) | Retain PPL (WikiText) | Held-out PPL (Pile) "
            "| LAMBADA acc (%) | LAMBADA word PPL |")  # fmt: skip
    lines = [caption, "", head, "|" + " --- |" * 9]
    lines.append(
        f"| Before (memorized) | – | – | {100 * before['el']:.2f} | {100 * before['ma']:.1f} | "
        f"{before['retain_ppl']:.2f} | {before['heldout_ppl']:.2f} | {100 * before['lambada_acc']:.1f} | "
        f"{before['lambada_ppl']:.1f} |"
    )
    lines.append(
        f"| Held-out TDEC (criterion) | – | – | {100 * before['heldout_el']:.2f} | "
        f"{100 * before['heldout_ma']:.1f} | | | | |"
    )
    for r in rows:
        name = r["method"] + (f" (lr ×{'/'.join(f'{f:g}' for f in r['lr_factor'])})" if r["lr_factor"] else "")
        epochs = f"fail ({r['failed']}/{r['runs']})" if r["failed"] else f"{r['epochs']:.1f}"
        lines.append(
            f"| {name} | {r['params_percent']:.2f} | {epochs} | {100 * r['el']:.2f} | "
            f"{100 * r['ma']:.1f} | {r['retain_ppl']:.2f} | {r['heldout_ppl']:.2f} | {100 * r['lambada_acc']:.1f} | "
            f"{r['lambada_ppl']:.1f} |"
        )
    a, b = verdict["fila_fewer_epochs_than_lora_gd"], verdict["fila_retain_ppl_moves_less_than_ga_and_gd"]
    holds = {True: "holds", False: "does not hold"}
    lines += [
        "", "Targets:",
        f"- FILA + IHL reaches the criterion in fewer epochs than LoRA + GD: **{holds[a['holds']]}** "
        f"({a['fila_ihl']:g} vs {a['lora_gd']:g} epochs; {a['failure_counts_as']} = failed on some forget set).",
        f"- FILA + IHL's retain perplexity moves less than GA's and GD's: **{holds[b['holds']]}** (change "
        f"from before: FILA + IHL {100 * b['FILA + IHL']:+.1f}%, GA {100 * b['GA']:+.1f}%, GD {100 * b['GD']:+.1f}%; "
        "compared by size).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def caption_text(scale: Scale, scale_name: str, model_params: int, data: Data, before: dict, wall_s: float) -> str:
    import torch

    from fastunlearn.engine import DEFAULT_LR

    forget = ", ".join(f"{n} ({k} seqs)" for n, k in data.sizes["forget"].items())
    return (
        f"**Table 1 ({scale_name} scale), after Cha et al. arXiv 2408.06621.** GPT-Neo with {scale.layers} layers, "
        f"width {scale.hidden}, {model_params / 1e6:.2f} M parameters, byte-level BPE of {scale.vocab_size} tokens "
        f"trained on the utility text. Memorizer: {scale.memorize_steps} AdamW steps of {scale.batch_general} "
        f"Pile/WikiText blocks + {scale.batch_forget} forget sequences ({data.sizes['general_tokens']:,} general "
        f"tokens). Forget sets: the first {scale.seq_len} tokens of TDEC texts, {forget}; held-out set: "
        f"{data.sizes['heldout']} sequences of {scale.heldout_file}, never trained on. Reductions from the paper: "
        f"a small model trained here instead of GPT-Neo 125M-2.7B, {scale.seq_len}-token instead of 200-token "
        f"sequences, {len(scale.forget_files)} forget sets of {scale.forget_size} instead of 3 of 32, LoRA rank "
        f"{scale.rank} (alpha {2 * scale.rank}), LAMBADA accuracy on {data.sizes['lambada']} passages as the "
        f"utility proxy (accuracy of greedy last-word decoding, and perplexity of the last word's tokens) instead of "
        f"the reasoning / dialogue suites. Retain set: {scale.retain_blocks} WikiText blocks "
        f"(retain loss and retain PPL: the methods with a retain loss train on these blocks, and the small memorizer "
        f"is far from converged on them, so they can lower it). Held-out PPL: {data.sizes['pile_heldout_docs']} "
        f"Pile documents never trained on. Stop rule (the paper's): forget EL_10 ≤ {before['heldout_el']:.4f} and MA ≤ "
        f"{before['heldout_ma']:.4f} (held-out values before unlearning), one AdamW update per epoch, at most "
        f"{scale.max_epochs} epochs; lr {scale.lr_full:g} (full) / {scale.lr_adapter:g} (adapters), the paper's "
        f"{DEFAULT_LR['full']:g} / {DEFAULT_LR['lora']:g} ×{scale.lr_full / DEFAULT_LR['full']:g}; "
        f"the tuned LoRA + IHL row takes the first of ×{', ×'.join(f'{f:g}' for f in scale.lr_sweep)} that meets "
        f"the criterion. Values are means over the forget sets, measured after unlearning. Machine: "
        f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; wall time {wall_s / 60:.1f} min."
    )


def write_plot(path: Path, results: dict[str, list[dict]], before_curves: dict) -> None:
    from matplotlib.figure import Figure

    from fastunlearn.engine.report import atomic_write

    sets = list(before_curves)
    fig = Figure(figsize=(6 * len(sets), 8), layout="constrained")
    axes = fig.subplots(2, len(sets), squeeze=False)
    for col, forget_set in enumerate(sets):
        start = before_curves[forget_set]
        for name, runs in results.items():
            run = next(r for r in runs if r["forget_set"] == forget_set)
            x = [0, *(e["epoch"] for e in run["curve"])]
            (line,) = axes[0, col].plot(x, [start["ma"], *(e["forget_ma"] for e in run["curve"])], "o-", ms=3,
                                        label=name)  # fmt: skip
            axes[1, col].plot(x, [start["retain_ppl"], *(e["retain_ppl"] for e in run["curve"])], "o-", ms=3,
                              color=line.get_color())  # fmt: skip
        axes[0, col].axhline(start["criterion_ma"], color="k", ls=":", label="held-out MA (criterion)")
        axes[0, col].set(title=f"forget set {forget_set}", ylabel="forget MA", ylim=(-0.02, 1.02))
        axes[1, col].set(xlabel="epoch (one update each)", ylabel="retain PPL (WikiText)", yscale="log")
    axes[0, 0].legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def write_outputs(out, rows, results, before, caption, verdict, scale, data, wall_s) -> None:
    from fastunlearn.engine.report import atomic_write, write_json

    curves = {
        r["forget_set"]: {"ma": r["baseline"]["forget"][0]["ma"], "retain_ppl": r["baseline"]["retain_ppl"],
                          "criterion_ma": r["criterion"]["ma"]}
        for r in results["GA"]
    }  # fmt: skip
    atomic_write(out / "table1.md", table_markdown(rows, before, caption, verdict))
    write_json(out / "table1.json", {
        "scale": asdict(scale), "data": data.sizes, "before": before, "rows": rows, "verdicts": verdict,
        "runs": {name: [{k: v for k, v in r.items() if k != "baseline"} for r in rs] for name, rs in results.items()},
        "wall_s": wall_s, "caption": caption,
    })  # fmt: skip
    write_plot(out / "table1.png", results, curves)
