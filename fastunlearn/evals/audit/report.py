"""The audit's outputs: ``DIR/audit.json`` (everything, per-sequence values included) and ``DIR/audit.md`` (the
verdicts and tables), each written atomically (``fastunlearn.utils.atomic``: a reader never sees half a file).

Only these two names are written in DIR, and an existing one is replaced only when this tool wrote it, recognized
by its content: ``audit.json`` holds the key ``MARKER_KEY``, ``audit.md`` starts with the line ``MD_MARKER``. DIR may
hold anything else (a run's outputs, say): nothing else there is read, changed or deleted. Refusals are
:class:`AuditOutError` (one line, naming the file), raised before any compute by :func:`check_out_dir`, and again
just before writing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fastunlearn.utils.atomic import atomic_write

JSON_NAME, MD_NAME = "audit.json", "audit.md"
MARKER_KEY = "fastunlearn_audit"  # audit.json: {MARKER_KEY: 1, ...}
MD_MARKER = "<!-- fastunlearn audit report: written by fastunlearn.audit, replaced by the next audit here -->"
FILES = (JSON_NAME, MD_NAME)


class AuditOutError(FileExistsError, ValueError):
    """The output directory cannot be used as asked; the message names the file and what to do. Both a
    FileExistsError and a ValueError: a user's mistake (the command line's exit status 2)."""


def is_own_json(path: Path) -> bool:
    try:
        return MARKER_KEY in json.loads(path.read_text())
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return False


def is_own_md(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MD_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as an absolute Path, or AuditOutError: a file in its way, an ``audit.json`` / ``audit.md`` this tool
    did not write, or a directory that cannot be written."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise AuditOutError(f"out_dir {str(out)!r} exists and is not a directory")
    for name, own in ((JSON_NAME, is_own_json), (MD_NAME, is_own_md)):
        path = out / name
        if path.exists() and not (path.is_file() and own(path)):
            raise AuditOutError(f"{str(path)!r} exists and was not written by fastunlearn audit: choose another "
                                "out_dir or move the file away")  # fmt: skip
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise AuditOutError(f"out_dir {str(out)!r} cannot be written ({str(probe)!r} is not writable)")
    return out


def finite(value):
    """``value`` with every non-finite float (a -inf log-likelihood, say) replaced by its name: JSON has no
    infinities."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write(out: Path, report: dict) -> tuple[Path, Path]:
    """audit.md, then audit.json (its marker last to appear), atomically; the checks of check_out_dir first."""
    out = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MD_NAME, to_markdown(report))
    atomic_write(out / JSON_NAME, json.dumps(finite(report), indent=1, allow_nan=False) + "\n")
    return out / JSON_NAME, out / MD_NAME


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def to_markdown(report: dict) -> str:
    n = report["config"]["el_n"]
    sets = report["sets"]
    lines = [MD_MARKER, "# Audit: does the forgetting hold?", ""]
    crit = report["criterion"]
    criterion = "" if crit is None else (f" Criterion (float): forget MA and EL_{n} at or below {_f(crit['ma'])} / "
                                         f"{_f(crit['el'])} ({crit['from']}).")  # fmt: skip
    lines.append(f"Model: {report['model']}; reference (before unlearning): {report['reference'] or 'none'}. "
                 f"Forget set {sets['forget']}, held-out set {sets['heldout']}, retain set {sets['retain'] or 'none'} "
                 f"sequences.{criterion} {report['seconds']:.0f} s.")  # fmt: skip
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    lines += [f"- {probe}: {line}" for probe, line in report["verdicts"].items()]
    if "quantization" in report:
        q = report["quantization"]
        lines += ["", "## Quantization", "", f"Criterion: {q['criterion']}.", "",
                  f"| format | forget MA | forget EL_{n} | held-out MA | held-out EL_{n} | held-out on Q(reference) "
                  f"MA / EL_{n} | verdict | s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in q["rows"]:
            ref = r["heldout_reference"]
            lines.append(f"| {r['format']} | {_f(r['forget']['ma'])} | {_f(r['forget']['el'])} | "
                         f"{_f(r['heldout']['ma'])} | {_f(r['heldout']['el'])} | "
                         f"{'–' if ref is None else _f(ref['ma']) + ' / ' + _f(ref['el'])} | "
                         f"{'passed' if r['passed'] else '**FAILED**'} | {r['seconds']:.0f} |")  # fmt: skip
    if "relearning" in report:
        rl = report["relearning"]
        s = rl["settings"]
        pre = rl["pre_unlearning"]
        lines += ["", "## Relearning", "",
                  f"{s['steps']} steps, lr {s['lr']:g}, {s['rows']} rows, {s['trials']} trial(s); {s['optimizer']}. "
                  f"Before unlearning: MA {_f(pre and pre['ma'])} / EL_{n} {_f(pre and pre['el'])} "
                  f"({rl['pre_unlearning_from'] or 'not given: no recovered fraction'}).", "",
                  f"| fine-tune | trained on | scored on | MA before → after | EL_{n} before → after | limit MA / "
                  f"EL_{n} | recovered MA / EL_{n} | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name in ("relearn", "control", "benign"):
            r = rl[name]
            if r is None:
                continue
            if name == "control":
                limit, frac, verdict = "–", r["rise_fraction"], "(reference for relearn)"
            else:
                limit = f"{_f(r['limit']['ma'])} / {_f(r['limit']['el'])}"
                frac, verdict = r["recovered"], "passed" if r["passed"] else "**FAILED**"
            lines.append(f"| {name} | {r['trained_on']} | {r['scored_on']} | {_f(r['before']['ma'])} → "
                         f"{_f(r['after']['ma'])} | {_f(r['before']['el'])} → {_f(r['after']['el'])} | {limit} | "
                         f"{_pct(frac['ma'])} / {_pct(frac['el'])} | {verdict} |")  # fmt: skip
    if "membership" in report:
        m = report["membership"]
        lines += ["", "## Membership", "",
                  f"AUC: P(forget sequence scores higher than held-out sequence), ties half; target: {m['target']}; "
                  f"margin {m['margin']:.2f}; k = {m['k']:g}.", "",
                  "| score | AUC | target AUC | PrivLeak | AUC before unlearning | verdict |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for score, r in m["scores"].items():
            if r["auc"] is None:
                lines.append(f"| {score} | – | – | – | – | {r['note']} |")
                continue
            lines.append(f"| {score} | {_f(r['auc'])} | {_f(r['auc_target'])} | {_f(r['privleak'])} | "
                         f"{_f(r['auc_reference'])} | {'passed' if r['passed'] else '**FAILED**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
