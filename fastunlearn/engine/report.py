"""What an unlearning run leaves for people: ``log.json``, ``report.md`` and ``metrics.png``, from its log.

Every file is written atomically (``fastunlearn.utils.atomic``): a reader
or an interrupted run never sees half a file.
``write_report`` and ``write_plot`` need only the log, so they can also re-render a finished run's
``log.json``. The plot needs matplotlib (imported when called).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

from fastunlearn.utils.atomic import atomic_write
from fastunlearn.utils.optional import missing


def check_plotting() -> None:
    """Raise before a run, not after it, if the plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise missing("matplotlib", "engine", "the metrics plot (metrics.png)")


def non_finite_key(value: object, where: str = "") -> str | None:
    """The key path (``tasks[0].epochs[1].forget_loss``) of the first NaN / inf float in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where or '(top level)'} is {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite_key(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


def write_json(path: Path, log: dict) -> None:
    """``log`` as JSON; RuntimeError naming the key of a NaN / inf (JSON has none: a run produced one)."""
    try:
        text = json.dumps(log, indent=2, allow_nan=False)
    except ValueError:
        found = non_finite_key(log)
        if found is None:
            raise
        raise RuntimeError(f"{path}: {found}, which JSON cannot hold; the run produced a non-finite number") from None
    atomic_write(path, text + "\n")


def _f(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _criterion_text(log: dict) -> str:
    crit, n = log["criterion"], log["config"]["el_n"]
    if crit["stop"] == "epochs":
        return f"none: stop='epochs' runs exactly {log['config']['max_epochs']} epochs per forget set"
    source = "the held-out set's values before unlearning" if crit["stop"] == "heldout" else "fixed thresholds"
    return f"forget MA ≤ {_f(crit['ma'])} and EL_{n} ≤ {_f(crit['el'])} ({source})"


def _deploy_name(log: dict) -> str:
    return log["deploy"]["format"].upper()


def _deploy_text(log: dict) -> str:
    """The deployed half of the criterion (deploy_quant), or nothing."""
    deploy, n = log.get("deploy"), log["config"]["el_n"]
    if deploy is None or log["criterion"]["stop"] == "epochs":
        return ""
    source = "the held-out set's values" if deploy["criterion"]["stop"] == "heldout" else "the same thresholds"
    return (f"; and on the model deployed in {_deploy_name(log)} (adapters merged, weights quantized): forget MA ≤ "
            f"{_f(deploy['criterion']['ma'])} and EL_{n} ≤ {_f(deploy['criterion']['el'])} ({source} on the original "
            f"model deployed so)")  # fmt: skip


def _deploy_rows(log: dict) -> list[tuple[str, dict, dict]]:
    """(name, before, after) rows of the deployed model (deploy_quant), or none."""
    deploy, after = log.get("deploy"), log["tasks"][-1]["after"].get("deploy")
    if deploy is None or after is None:
        return []
    name = _deploy_name(log)
    rows = [(f"forget set {i + 1}, {name}", b, a) for i, (b, a) in enumerate(zip(deploy["forget"], after["forget"]))]
    if deploy["heldout"] is not None and after["heldout"] is not None:
        rows.append((f"held-out, {name}", deploy["heldout"], after["heldout"]))
    return rows


def _deploy_note(log: dict) -> list[str]:
    if log.get("deploy") is None:
        return []
    name, deploy = _deploy_name(log), log["deploy"]
    counts = ", ".join(f"{count} in {fmt.upper()}" for fmt, count in deploy["weights"].items())
    quant_aware = log["config"].get("quant_aware", "none")
    trained = "" if quant_aware == "none" else f" Trained at the weights deployed in {quant_aware.upper()}."
    return [
        "",
        f"{name} columns: the model deployed in {name} ({counts} weight tensors; adapters merged first), "
        "measured at the epochs whose float values meet the float criterion (elsewhere it cannot change the "
        f"decision; – = not measured) and after each task; deployed baseline {deploy['seconds']:.1f} s.{trained}",
    ]


def _sample_text(log: dict, key: str) -> str:
    """How many retain sequences ``log["data"][key]`` counts: on all M, or on a seeded sample of N of M."""
    used, total = log["data"].get(key), log["data"]["retain"]
    return (
        f"on all {total} sequences" if used in (None, total) else f"on a seeded sample of {used} of {total} sequences"
    )


def _fisher_text(log: dict) -> str:
    if log["config"]["params"] != "fila" or log["data"].get("fisher_retain_sequences") is None:
        return ""
    return f"; FILA's retain Fisher {_sample_text(log, 'fisher_retain_sequences')}"


def _heldout_notes(log: dict) -> list[str]:
    """Where the held-out values before came from, and why EL after may be missing."""
    after, notes = log["tasks"][-1]["after"]["heldout"], []
    cache = log.get("baseline_cache")
    if cache is not None:
        how = "read from" if cache["hit"] else "measured, then stored in"
        notes.append(f"The held-out set's values before unlearning were {how} the cache ({cache['file']}).")
    if after is not None and after["el"] is None:
        n = log["config"]["el_n"]
        notes.append(f"The held-out set's EL_{n} after unlearning was not measured (–): it costs as much as the one "
                     "before; eval_heldout_el_after=True (--heldout-el-after) measures it.")  # fmt: skip
    return ["", " ".join(notes)] if notes else []


def _utility_lines(log: dict) -> list[str]:
    """The utility sets' perplexity before and after unlearning and their ratio (after / before: 1 = unharmed),
    or nothing when the run had none."""
    before = log["baseline"].get("utility_ppl")
    if not before:
        return []
    after = log["tasks"][-1]["after"]["utility_ppl"]
    used, total = log["data"]["utility_ppl_sequences"], log["data"]["utility"]
    lines = [
        "",
        "## Utility: perplexity on text never trained on",
        "",
        "| set | sequences | PPL before | PPL after | after / before |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, value in before.items():
        count = f"{used[name]} of {total[name]}" if used[name] != total[name] else f"all {total[name]}"
        lines.append(f"| {name} | {count} | {value:.3f} | {after[name]:.3f} | {after[name] / value:.3f} |")
    return lines


def _met(value: bool | None) -> str:
    return "–" if value is None else "met" if value else "not met"


def hook_names(log: dict) -> list[str]:
    """The names of the evaluation hook's values (``evaluate_each_epoch``, logged under "on_epoch"), in order of first
    appearance (before, then each epoch)."""
    records = [log["baseline"], *(e for task in log["tasks"] for e in task["epochs"])]
    return list(dict.fromkeys(name for r in records for name in r.get("on_epoch") or {}))


def outcome(log: dict) -> str:
    """Why a finished run succeeded or failed, one line."""
    if log["success"] and log["criterion"]["stop"] == "epochs":
        return f"every forget set ran its {log['config']['max_epochs']} epochs"
    if log["success"]:
        return "every forget set met the criterion" + (" and still does" if len(log["tasks"]) > 1 else "")
    reasons = [f"forget set {t['task'] + 1}: {t['stop_reason']}" for t in log["tasks"] if not t["success"]]
    reasons += [
        f"forget set {i + 1} met it when its training stopped but not after the later tasks (MA {_f(m['ma'])}, "
        f"EL {_f(m['el'])})"
        for i, m in enumerate(log["tasks"][-1]["after"]["forget"])
        if log["tasks"][i]["success"] and m["met"] is False
    ]
    deployed = (log["tasks"][-1]["after"].get("deploy") or {}).get("forget", [])
    reasons += [
        f"forget set {i + 1} deployed in {_deploy_name(log)} does not meet it after the last task (MA {_f(m['ma'])}, "
        f"EL {_f(m['el'])})"
        for i, m in enumerate(deployed)
        if log["tasks"][i]["success"] and m["met"] is False
    ]
    return "; ".join(reasons)


def _updates(cfg: dict) -> str:
    """How an epoch updates: one update from the whole forget set, or updates of batch_size sequences."""
    size = cfg.get("batch_size")
    return "one update per epoch" if size is None else f"updates of {size} forget sequences"


def _ppl_when(cfg: dict) -> str:
    """When the retain and utility perplexities were measured (``eval_every``; a log written before it: every epoch)."""
    every = cfg.get("eval_every", 1)
    if every == 0:
        return "Perplexities are measured before unlearning and after each forget set (eval_every=0), not per epoch."
    if every == 1:
        return "Perplexities are measured after every epoch (eval_every=1)."
    return (f"Perplexities are measured before unlearning, every {every} epochs and after each forget set "
            f"(eval_every={every}; – = not measured).")  # fmt: skip


def report_markdown(log: dict) -> str:
    """The run as Markdown: result, settings, before → after, and a table of every epoch of every task."""
    cfg, model, n = log["config"], log["model"], log["config"]["el_n"]
    verdict = "SUCCESS" if log["success"] else "FAILURE"
    result = f"**Result: {verdict}.** Criterion: {_criterion_text(log)}{_deploy_text(log)}. Outcome: {outcome(log)}."
    objective = cfg["forget_loss"].upper() + (
        f" + {cfg['retain_weight']:g} × retain loss" if cfg["retain_weight"] else ""
    )
    adapters = f", rank {cfg['rank']}, alpha {cfg['alpha']:g}" if cfg["params"] != "full" else ""
    timings = log["timings"]
    lines = [
        "# Unlearning report", "", result, "", "| setting | value |", "| --- | --- |",
        f"| objective | {objective} |",
        f"| trained parameters | {cfg['params']}{adapters}: {model['trainable_percent']:.3f}% "
        f"({model['trainable_params']:,} of {model['total_params']:,}) |",
        f"| optimizer | AdamW, lr {log['learning_rate']:g}, betas {tuple(cfg['betas'])}, weight decay "
        f"{cfg['weight_decay']:g}; {_updates(cfg)} (micro-batches of {cfg['micro_batch_size']}) |",
        f"| epochs | min {cfg['min_epochs']}, max {cfg['max_epochs']} per forget set |",
        f"| model | {' '.join(filter(None, (model['class'], model['name_or_path'])))} in {cfg['dtype']} on "
        f"{model['device']} |",
        f"| data | forget {' + '.join(map(str, log['data']['forget']))}, retain {log['data']['retain']}, held-out "
        f"{log['data']['heldout']} sequences of {log['data']['seq_len']} tokens{_fisher_text(log)} |",
        f"| time | {timings['total_s']:.1f} s (training {timings['train_s']:.1f} s, evaluation "
        f"{timings['eval_s'] + timings['baseline_s']:.1f} s, export {timings['export_s']:.1f} s"
        f"{', resumed ' + str(log['resumes']) + ' time(s)' if log['resumes'] else ''}) |",
    ]  # fmt: skip
    before, after = log["baseline"], log["tasks"][-1]["after"]
    lines += ["", "## Before → after", "", f"| set | MA before | MA after | EL_{n} before | EL_{n} after | criterion |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    rows = [(f"forget set {i + 1}", b, a) for i, (b, a) in enumerate(zip(before["forget"], after["forget"]))]
    if before["heldout"] is not None:
        rows.append(("held-out", before["heldout"], after["heldout"]))
    rows += _deploy_rows(log)
    for name, b, a in rows:
        met = "" if "met" not in a else _met(a["met"])
        lines.append(f"| {name} | {_f(b['ma'])} | {_f(a['ma'])} | {_f(b['el'])} | {_f(a['el'])} | {met} |")
    lines += _heldout_notes(log) + _deploy_note(log)
    lines += _utility_lines(log)
    if before["retain_ppl"] is not None:
        lines += ["", f"Retain perplexity {_sample_text(log, 'retain_ppl_sequences')} (the retain set trained on): "
                  f"{before['retain_ppl']:.3f} before, {after['retain_ppl']:.3f} after. The retain loss trains on "
                  "it, so it says nothing about damage; text never trained on (utility sets) does."]  # fmt: skip
    names, hooks = list(before.get("utility_ppl") or {}), hook_names(log)
    deployed = [] if log.get("deploy") is None else [f"{_deploy_name(log)} MA", f"{_deploy_name(log)} EL_{n}"]
    if before.get("on_epoch"):
        values = " ".join(f"| {_f(before['on_epoch'].get(h))} " for h in hooks)
        lines += ["", "## on_epoch values before unlearning", "", "| " + " | ".join(hooks) + " |",
                  "| " + " | ".join(["---"] * len(hooks)) + " |", values + "|"]  # fmt: skip
    for task in log["tasks"]:
        heads = [
            "epoch",
            "forget loss",
            "micro-batch range",
            "retain loss",
            "grad norm",
            "forget MA",
            f"forget EL_{n}",
            *deployed,
            "retain PPL (trained on)",
            *(f"{name} PPL" for name in names),
            *hooks,
            "criterion",
        ]
        lines += ["", f"## Forget set {task['task'] + 1} ({task['size']} sequences): {task['stop_reason']}", "",
                  "| " + " | ".join(heads) + " |", "| " + " | ".join(["---"] * len(heads)) + " |"]  # fmt: skip
        for e in task["epochs"]:
            low, high = e["forget_loss_range"]
            values = e.get("deploy") or {}
            quantized = "".join(f"{_f(values.get(key))} | " for key in ("ma", "el")) if deployed else ""
            utility = "".join(f"{_f((e['utility_ppl'] or {}).get(name), 3)} | " for name in names)
            utility += "".join(f"{_f((e.get('on_epoch') or {}).get(h))} | " for h in hooks)
            lines.append(
                f"| {e['epoch']} | {_f(e['forget_loss'])} | [{_f(low)}, {_f(high)}] | {_f(e['retain_loss'])} | "
                f"{_f(e['grad_norm'])} | {_f(e['forget_ma'])} | {_f(e['forget_el'])} | {quantized}"
                f"{_f(e['retain_ppl'], 3)} | "
                f"{utility}{_met(e['criterion_met'])} |"
            )
        if len(log["tasks"]) > 1:
            measured = ", ".join(
                f"set {i + 1} MA {_f(m['ma'])} EL {_f(m['el'])}" for i, m in enumerate(task["after"]["forget"])
            )
            lines += ["", f"After this task: {measured}."]
    when = "once the forget MA meets its limit"
    if log["criterion"]["stop"] == "epochs":
        when = "with a criterion (never with stop='epochs')"
    lines += ["", f"EL_{n} is measured only {when} (– = not measured). Losses are "
              "before each epoch's update; the range is over that epoch's micro-batches."]  # fmt: skip
    if before["retain_ppl"] is not None or names:
        lines[-1] += f" {_ppl_when(cfg)}"
    return "\n".join(lines) + "\n"


def write_report(path: Path, log: dict) -> None:
    atomic_write(path, report_markdown(log))


def _plot_hooks(ax, x: list[int], values: dict[str, list[float | None]]) -> None:
    """The evaluation hook's values per epoch (None: a gap), on a log scale when they are positive and span > 100x."""
    measured = [v for ys in values.values() for v in ys if v is not None]
    for name, ys in values.items():
        ax.plot(x, [math.nan if v is None else v for v in ys], "o-", label=name)
    if measured and min(measured) > 0 and max(measured) > 100 * min(measured):
        ax.set_yscale("log")
    ax.set(ylabel="on_epoch values")
    ax.legend(fontsize="small")


def _plot_deployed(ax, log: dict, task: dict, x: list[int], color) -> None:
    """deploy_quant: the forget set's MA on the deployed model (before, the epochs it was measured, after)."""
    if log.get("deploy") is None:
        return
    k, name = task["task"], _deploy_name(log)
    points = [(x[0], log["deploy"]["forget"][k]["ma"])]
    points += [(xi, e["deploy"]["ma"]) for xi, e in zip(x[1:], task["epochs"]) if e.get("deploy")]
    if task["after"].get("deploy") is not None:
        points.append((x[-1], task["after"]["deploy"]["forget"][k]["ma"]))
    label = f"forget MA, {name}" + (f" (set {k + 1})" if len(log["tasks"]) > 1 else "")
    ax.plot(*zip(*points), "D--", color=color, mfc="none", lw=0.8, label=label)


def measured(x: list[int], ys: list[float | None]) -> tuple[list[int], list[float]]:
    """The points of ``ys`` that were measured (None: not measured at that epoch, left out rather than drawn)."""
    points = [(xi, y) for xi, y in zip(x, ys) if y is not None]
    return [p[0] for p in points], [p[1] for p in points]


def write_plot(path: Path, log: dict) -> None:
    """Forget MA and EL_n per epoch (epoch 0: before) with the criterion's limits; in continual runs the earlier
    sets' values after each later task (x); retain PPL if measured; each utility set's PPL if any, at the epochs
    they were measured (before, every ``eval_every``-th epoch, at the end of each task)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    n, crit, tasks = log["config"]["el_n"], log["criterion"], log["tasks"]
    has_ppl = log["baseline"]["retain_ppl"] is not None
    utility = list(log["baseline"].get("utility_ppl") or {})
    hooks = hook_names(log)
    panels = 1 + has_ppl + bool(utility) + bool(hooks)
    fig = Figure(figsize=(8, 2 + 2 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    start, ppl_x, ppl_y, colors = 0, [0], [log["baseline"]["retain_ppl"]], []
    utility_y = {name: [log["baseline"]["utility_ppl"][name]] for name in utility}
    hook_y = {name: [(log["baseline"].get("on_epoch") or {}).get(name)] for name in hooks}
    for task in tasks:
        first = log["baseline"]["forget"][task["task"]]
        x = [start, *(start + e["epoch"] for e in task["epochs"])]
        label = f" (set {task['task'] + 1})" if len(tasks) > 1 else ""
        (ma,) = axes[0].plot(
            x, [first["ma"], *(e["forget_ma"] for e in task["epochs"])], "o-", label=f"forget MA{label}"
        )
        colors.append(ma.get_color())
        el = [(xi, v) for xi, v in zip(x, [first["el"], *(e["forget_el"] for e in task["epochs"])]) if v is not None]
        axes[0].plot(*zip(*el), "s", color=colors[-1], mfc="none", label=f"forget EL_{n}{label}")
        _plot_deployed(axes[0], log, task, x, colors[-1])
        for j, after in enumerate(task["after"]["forget"][:-1]):  # earlier sets, measured again
            label = "an earlier set's MA after a later task" if (task["task"], j) == (1, 0) else None
            axes[0].plot(x[-1], after["ma"], "x", color=colors[j], ms=9, label=label)
        ppl_x += x[1:]
        end = task["after"] or task["epochs"][-1]  # the task's end: measured when it stopped
        ppl_y += [e["retain_ppl"] for e in task["epochs"][:-1]] + [end["retain_ppl"]]
        for name in utility:
            utility_y[name] += [(e["utility_ppl"] or {}).get(name) for e in task["epochs"][:-1]]
            utility_y[name].append((end["utility_ppl"] or {}).get(name))
        for name in hooks:
            hook_y[name] += [(e.get("on_epoch") or {}).get(name) for e in task["epochs"]]
        start = x[-1]
        if len(tasks) > 1:
            axes[0].axvline(start, color="grey", lw=0.5)
    limit = "held-out" if crit["stop"] == "heldout" else "threshold"
    if crit["stop"] != "epochs":  # stop="epochs": no criterion
        axes[0].axhline(crit["ma"], color="tab:red", ls=":", label=f"{limit} MA (criterion)")
        axes[0].axhline(crit["el"], color="tab:purple", ls=":", label=f"{limit} EL_{n} (criterion)")
    if log.get("deploy") is not None and crit["stop"] != "epochs":
        axes[0].axhline(log["deploy"]["criterion"]["ma"], color="tab:red", ls="--", lw=0.8,
                        label=f"{limit} MA, {_deploy_name(log)} (criterion)")  # fmt: skip
    axes[0].set(ylabel="memorization", ylim=(-0.02, 1.02), title="Forget set during unlearning")
    axes[0].legend(fontsize="small")
    if has_ppl:
        axes[1].plot(*measured(ppl_x, ppl_y), "o-", color="tab:green")
        axes[1].set(ylabel="retain perplexity\n(trained on)")
    if utility:
        ax = axes[1 + has_ppl]
        for name in utility:
            ax.plot(*measured(ppl_x, utility_y[name]), "o-", label=name)
        ax.set(ylabel="utility perplexity\n(never trained on)")
        ax.legend(fontsize="small")
    if hooks:
        _plot_hooks(axes[-1], ppl_x, hook_y)
    axes[-1].set(xlabel=f"epoch ({_updates(log['config'])}; 0 = before)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())
