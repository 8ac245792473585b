"""TOFU (Maini et al. 2024) as TOFU runs it, with the methods of Cha et al. (arXiv 2408.06621, Sec. 5.2, Figure 5),
on a real model: SmolLM2-135M-Instruct as ``fastunlearn.demo.smollm2.real_model()`` provides it, on a TOFU subset sized
so that forget quality resolves on a CPU.

    python benchmarks/paper/tofu.py --data ../shared/data/tofu --estimate     # measure, print the time of each step
    nohup python benchmarks/paper/tofu.py --data ../shared/data/tofu --ranks 8 32 --workers 2 \
        > benchmarks/results/tofu/run.log 2>&1 &

The subset (defaults): 20 authors, 400 pairs. Forget = forget01 (its 2 authors, 40 pairs, all evaluated: a KS test
of 40 truth ratios against 40); retain = the first ``--retain-authors`` 18 authors of the matching retain split
(360 pairs; retain_perturbed.json holds their evaluation questions). The steps, each cached under ``--cache`` (a
rerun skips what is finished, and resumes an interrupted fine-tune or unlearning run from its last epoch):

1. Retain model: ``fastunlearn.finetune`` of the real model on the retain pairs; target model: the same on forget +
   retain (TOFU: 5 epochs, effective batch 32, weight decay 0.01, one warm-up epoch; lr ``--ft-lr``).
2. TOFU's evaluation (``evaluate_tofu``) of both, as TOFU runs it: the first ``--max-questions`` 300 rows of each
   set (all 40 forget questions, the first 300 retain questions of the 18 authors, all 100 real-author and 117
   world-fact questions), greedy answers until eos or prompt + answer = 200 tokens, TOFU's Phi-1.5 prompt format
   (``--template tofu-phi``), the model in bfloat16 (``--eval-dtype``; TOFU evaluates in bfloat16; LoRA adapters
   merged first, as TOFU saves its unlearned models). The retain model's forget-set truth ratios are the reference
   of forget quality (epoch 0 of every run is the target model's evaluation).
3. Each method x rank (GA, GD, IHL, FILA + IHL, NPO, all with adapters of rank 4 / 8 / 16 / 32, alpha = 2 x rank:
   Figure 5's methods and ranks, NPO beside them) unlearns the forget set from the target model through
   ``fastunlearn.unlearn`` with the paper's protocol: ``stop="epochs"`` for 5 epochs, an effective batch of 32
   pairs per update (``UnlearnConfig.batch_size``: forget01's 40 pairs make 2 updates an epoch), AdamW (betas 0.9,
   0.999, weight decay 0.01: TOFU's) at lr 2e-4, the retain pairs as the retain set (GD, IHL, FILA + IHL, NPO).
   Its ``on_epoch`` hook evaluates TOFU after every epoch (cached per epoch, beside the run's folder).
4. ``--out``: runs.jsonl (one record per finished run), tofu.md (a table per epoch) and tofu.png (the paper's
   Figure 5: model utility against forget quality, one curve per method and rank, markers growing with the
   epoch, the target model's square and the retain model's star); ``tofu_report.py`` writes them.

``--workers`` processes (one torch thread each: on 2 cores about twice one process's throughput) take the
(method, rank) runs in the order of ``--ranks`` (8 and 32 first). A quick end-to-end check (a few minutes):
``--forget-pairs 4 --retain-authors 1 --max-questions 4 --ft-epochs 1 --epochs 2 --methods IHL --ranks 4
--max-length 48 --out /tmp/tofu-smoke --cache /tmp/tofu-smoke-cache``.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tofu_report, tofu_estimate
from tofu_report import write_outputs  # noqa: E402

logger = logging.getLogger("tofu_bench")
PAIRS_PER_AUTHOR = 20  # TOFU: 20 question/answer pairs per fictitious author, stored author by author
RETAIN_SPLIT = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
SETS = ("forget", "retain", "real_authors", "world_facts")
METRICS = ("probability", "rouge_l", "truth_ratio")


@dataclass(frozen=True)
class Method:
    name: str
    forget_loss: str
    retain_weight: float
    params: str  # "lora" | "fila": Figure 5 trains adapters for every method

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" + ", "-").replace(" ", "-")


METHODS = {m.name: m for m in (
    Method("GA", "ga", 0.0, "lora"), Method("GD", "ga", 1.0, "lora"), Method("IHL", "ihl", 1.0, "lora"),
    Method("FILA + IHL", "ihl", 1.0, "fila"), Method("NPO", "npo", 1.0, "lora"),
)}  # fmt: skip
RANKS = (8, 32, 4, 16)  # run in this order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="TOFU's JSON files (e.g. ../shared/data/tofu)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tofu")
    p.add_argument("--cache", type=Path, help="step cache (default: <fastunlearn cache root>/tofu)")
    p.add_argument("--model", help="base model directory (default: SmolLM2-135M, demo.smollm2.real_model())")
    p.add_argument("--estimate", action="store_true", help="measure a few batches, print each step's time, exit")
    p.add_argument("--split", default="forget01", choices=list(RETAIN_SPLIT), help="forget split (forget01)")
    p.add_argument("--forget-pairs", type=int, help="only the first N pairs of the forget split (all)")
    p.add_argument("--retain-authors", type=int, default=18, help="retain authors trained on; 0: all (18)")
    p.add_argument("--max-questions", type=int, default=300, help="evaluated rows per set, TOFU's ds_size (300)")
    p.add_argument("--max-length", type=int, default=200, help="prompt + greedy answer tokens, TOFU's (200)")
    p.add_argument("--template", default="tofu-phi", help="QA format (tofu-phi: TOFU's Phi-1.5 format)")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"), help="evaluation (bf16)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="rows per forward / generate call (32)")
    p.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs (TOFU: 5)")
    p.add_argument("--ft-lr", type=float, default=2e-4, help="fine-tuning peak lr (TOFU: 2e-5 Phi-1.5) (2e-4)")
    p.add_argument("--ft-batch", type=int, default=32, help="fine-tuning pairs per update (TOFU: 32)")
    p.add_argument("--epochs", type=int, default=5, help="unlearning epochs (5)")
    p.add_argument("--batch-size", type=int, default=32, help="forget pairs per unlearning update (32)")
    p.add_argument("--lr", type=float, default=2e-4, help="unlearning lr (the paper's 2e-4 for Phi-1.5)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="adapter ranks, in run order")
    p.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward/backward (8)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the runs (2 on 2 idle cores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_questions", "max_length", "eval_batch_size", "ft_epochs", "ft_batch", "epochs", "batch_size",
                 "micro_batch_size", "workers", "threads"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.forget_pairs is not None and args.forget_pairs < 1 or args.retain_authors < 0 or min(args.ranks) < 1:
        p.error("--forget-pairs and --ranks must be >= 1, --retain-authors >= 0")
    return args


def key(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_data(args, tokenizer) -> dict:
    """The pairs trained on (forget, retain, target = both), their SequenceSets, TOFU's evaluation sets (the retain
    questions limited to the retain authors trained on) and the sizes."""
    from fastunlearn.data.qa import load_qa, tokenize_qa
    from fastunlearn.evals.tofu import load_tofu_sets

    sets = load_tofu_sets(args.data, args.split)
    forget = sets["forget"][: args.forget_pairs]
    retain = load_qa(args.data / f"{RETAIN_SPLIT[args.split]}.json", role="TOFU retain split")
    retain = retain[: args.retain_authors * PAIRS_PER_AUTHOR] if args.retain_authors else retain
    trained = {p.question for p in retain}
    sets["forget"], sets["retain"] = forget, [p for p in sets["retain"] if p.question in trained]
    if not sets["retain"]:
        raise SystemExit("no retain_perturbed question belongs to the retain authors trained on")

    def seqs(pairs, role):
        return tokenize_qa(pairs, tokenizer, template=args.template, role=role)

    evaluated = {name: min(len(p), args.max_questions) for name, p in sets.items()}
    return {"forget": seqs(forget, "forget"), "retain": seqs(retain, "retain"),
            "target": seqs(forget + retain, "target"), "eval": sets,
            "sizes": {"forget": len(forget), "retain": len(retain), "eval": evaluated}}  # fmt: skip


def settings_of(args) -> dict:
    """What the fine-tuned models depend on."""
    return {"model": args.model or "real_model", "split": args.split, "forget_pairs": args.forget_pairs,
            "retain_authors": args.retain_authors, "template": args.template, "ft_epochs": args.ft_epochs,
            "ft_lr": args.ft_lr, "ft_batch": args.ft_batch, "seed": args.seed}  # fmt: skip


def eval_settings(args) -> dict:
    return {"max_questions": args.max_questions, "max_length": args.max_length, "eval_dtype": args.eval_dtype,
            "template": args.template}  # fmt: skip


def base_model(args):
    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.models import load_model

    return real_model() if args.model is None else load_model(args.model, "float32", "cpu")


def finetuned(folder: Path, seqs, args) -> Path:
    """The base model fine-tuned on ``seqs`` (cached in ``folder``, resumed when interrupted): its model folder."""
    import fastunlearn
    from fastunlearn.engine.finetune import FinetuneConfig

    if not (folder / "model" / "config.json").is_file():
        model, tokenizer = base_model(args)
        config = FinetuneConfig(epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch,
                                micro_batch_size=args.micro_batch_size, seed=args.seed)  # fmt: skip
        start = time.perf_counter()
        fastunlearn.finetune(model, seqs, config, folder, tokenizer=tokenizer)
        logger.info("fine-tuned %s on %d pairs in %.0f s", folder.name, len(seqs), time.perf_counter() - start)
    return folder / "model"


def eval_copy(model, dtype: str):
    """What TOFU evaluates: a copy with the adapters merged into the weights, in ``dtype``."""
    import torch

    from fastunlearn.lora.layer import lora_layers

    copied = copy.deepcopy(model)
    for layer in lora_layers(copied).values():
        layer.merge()
    return copied.to(getattr(torch, dtype)).eval()


def evaluate(model, tokenizer, sets, args, reference=None) -> dict:
    from fastunlearn.evals.tofu import evaluate_tofu

    return evaluate_tofu(eval_copy(model, args.eval_dtype), tokenizer, sets, retain_reference=reference,
                         max_questions=args.max_questions, max_length=args.max_length,
                         batch_size=args.eval_batch_size, template=args.template)  # fmt: skip


def evaluated(path: Path, model_dir: Path, sets, args, reference=None) -> dict:
    """``evaluate`` of the model in ``model_dir``, cached as JSON in ``path``."""
    from fastunlearn.evals.tofu import save_result
    from fastunlearn.models import load_model

    if not path.is_file():
        model, tokenizer = load_model(model_dir, "float32", "cpu")
        save_result(evaluate(model, tokenizer, sets, args, reference), path)
    return json.loads(path.read_text())


def summary(result: dict) -> dict:
    """The numbers a run records per epoch: forget quality, model utility, each set's three."""
    values = {"forget_quality": result.get("forget_quality"), "model_utility": result.get("model_utility")}
    values.update({f"{s}_{m}": result[s][m] for s in SETS if s in result for m in METRICS})
    return values


def jobs(args) -> list[tuple[str, int]]:
    return [(name, rank) for rank in args.ranks for name in args.methods]


def run_key(args, method: str, rank: int) -> str:
    return key({**settings_of(args), **eval_settings(args), "method": method, "rank": rank, "lr": args.lr,
                "epochs": args.epochs, "batch_size": args.batch_size})  # fmt: skip


def prepare(args, cache: Path, threads: int) -> dict:
    """Steps 1-2: the fine-tuned models and their evaluations (cached); the state the runs share."""
    import torch

    torch.set_num_threads(threads)
    _, tokenizer = base_model(args)
    data = load_data(args, tokenizer)
    models = cache / f"{args.split}-{key(settings_of(args))}"
    models.mkdir(parents=True, exist_ok=True)
    logger.info("%s: forget %d pairs, retain %d pairs, evaluated questions %s; cache %s", args.split,
                data["sizes"]["forget"], data["sizes"]["retain"], data["sizes"]["eval"], models)  # fmt: skip
    ekey = key(eval_settings(args))
    retain_dir = finetuned(models / "retain-model", data["retain"], args)
    retain_eval = evaluated(models / f"retain-eval-{ekey}.json", retain_dir, data["eval"], args)
    target_dir = finetuned(models / "target-model", data["target"], args)
    target_eval = evaluated(models / f"target-eval-{ekey}.json", target_dir, data["eval"], args, retain_eval)
    head = {"split": args.split, "settings": settings_of(args), "eval_settings": eval_settings(args),
            "sizes": data["sizes"], "retain_model": summary(retain_eval), "target_model": summary(target_eval),
            "eval_seconds": {"retain": retain_eval["seconds"], "target": target_eval["seconds"]}}  # fmt: skip
    return {"models": models, "target_dir": target_dir, "retain_eval": retain_eval, "target_eval": target_eval,
            "head": head}  # fmt: skip


def unlearn_run(method: Method, rank: int, shared: dict, data: dict, tokenizer, args) -> dict:
    """One method at one rank from the target model; its record for runs.jsonl."""
    from fastunlearn.data.text import UnlearningData
    from fastunlearn.engine import UnlearnConfig, unlearn
    from fastunlearn.evals.tofu import save_result
    from fastunlearn.models import load_model

    rkey = run_key(args, method.name, rank)
    folder = shared["models"] / "runs" / f"{method.slug}-r{rank}-{rkey}"
    evals = folder.with_name(folder.name + "-evals")  # beside the run: the engine owns its folder
    evals.mkdir(parents=True, exist_ok=True)
    config = UnlearnConfig(forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params,
                           rank=rank, alpha=2.0 * rank, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01,
                           stop="epochs", max_epochs=args.epochs, batch_size=args.batch_size,
                           micro_batch_size=args.micro_batch_size, seed=args.seed)  # fmt: skip
    seconds = {"hook_s": 0.0}

    def hook(model, epoch: int) -> dict:
        if epoch == 0:
            return summary(shared["target_eval"])  # the target model, evaluated once for every run
        path = evals / f"epoch-{epoch}.json"  # a resumed epoch trains bit-equal (same threads): reused
        if not path.is_file():
            start = time.perf_counter()
            save_result(evaluate(model, tokenizer, data["eval"], args, shared["retain_eval"]), path)
            seconds["hook_s"] += time.perf_counter() - start
        values = summary(json.loads(path.read_text()))
        logger.info("%s rank %d epoch %d: forget quality %.3g, model utility %.4f", method.name, rank, epoch,
                    values["forget_quality"], values["model_utility"])  # fmt: skip
        return values

    log_file = folder / "log.json"
    if log_file.is_file() and json.loads(log_file.read_text()).get("status") == "finished":
        shutil.rmtree(folder)  # finished, but its record was not written: run again (its evaluations are cached)
    model, _ = load_model(shared["target_dir"], "float32", "cpu")
    start = time.perf_counter()
    result = unlearn(model, UnlearningData(data["forget"], data["retain"]), config, folder, evaluate_each_epoch=hook)
    log = result.log
    trajectory = [{"epoch": 0, **log["baseline"]["on_epoch"]}]
    trajectory += [{"epoch": e["epoch"], "forget_ma": e["forget_ma"], "forget_loss": e["forget_loss"],
                    **e["on_epoch"]} for e in log["tasks"][0]["epochs"]]  # fmt: skip
    record = {"key": rkey, "method": method.name, "rank": rank, "params": method.params,
              "forget_loss": method.forget_loss, "retain_weight": method.retain_weight, "lr": args.lr,
              "epochs": args.epochs, "batch_size": args.batch_size, "success": result.success,
              "trainable_percent": log["model"]["trainable_percent"], "trajectory": trajectory,
              "train_s": log["timings"]["train_s"], "hook_s": seconds["hook_s"], "total_s": log["timings"]["total_s"],
              "wall_s": time.perf_counter() - start, **shared["head"]}  # fmt: skip
    if json.loads(log_file.read_text()).get("status") == "finished":
        shutil.rmtree(folder)  # this run's own folder (a 0.5 GB merged model): its numbers are in the record
    return record


def read_runs(path: Path) -> list[dict]:
    """This script's records in ``path`` (a record of another version, without "eval_settings", is left out)."""
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if "eval_settings" in r]


def append_run(path: Path, record: dict) -> None:
    """One line appended under an exclusive lock (several workers share the file)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


_WORKER: dict = {}  # this process's (args, shared state, data, tokenizer): set by _start_worker


def _log_to_terminal() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    for name in ("fastunlearn.evals.tofu", "absl"):  # a line per set, rouge_score's per call: too many
        logging.getLogger(name).setLevel(logging.WARNING)


def _start_worker(args, shared: dict) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _log_to_terminal()
    tokenizer = base_model(args)[1]
    _WORKER.update(args=args, shared=shared, data=load_data(args, tokenizer), tokenizer=tokenizer)


def run_job(job: tuple[str, int]) -> dict | None:
    args, shared = _WORKER["args"], _WORKER["shared"]
    name, rank = job
    runs_file = args.out / "runs.jsonl"
    if any(r.get("key") == run_key(args, name, rank) for r in read_runs(runs_file)):
        logger.info("%s rank %d: finished before, skipped", name, rank)
        return None
    logger.info("%s rank %d: unlearning", name, rank)
    record = unlearn_run(METHODS[name], rank, shared, _WORKER["data"], _WORKER["tokenizer"], args)
    append_run(runs_file, record)
    logger.info("%s rank %d: done in %.0f s (evaluation %.0f s)", name, rank, record["wall_s"], record["hook_s"])
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"tofu.py: skipped: the TOFU data folder {args.data} does not exist (--data)", file=sys.stderr)
        return 0
    from fastunlearn.models import cache_root

    _log_to_terminal()
    if args.estimate:
        import torch
        from tofu_estimate import estimate

        torch.set_num_threads(args.threads)  # what each worker runs with

        print(estimate(args, load_data(args, base_model(args)[1])))
        return 0
    cache = args.cache or cache_root() / "tofu"
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shared = prepare(args, cache, args.workers * args.threads)
    runs_file = args.out / "runs.jsonl"
    if args.workers == 1:
        _start_worker(args, shared)
        for job in jobs(args):
            run_job(job)
            write_outputs(args.out, read_runs(runs_file))
    else:  # spawn: each worker loads the data itself (no fork of a process that holds torch threads)
        with multiprocessing.get_context("spawn").Pool(args.workers, _start_worker, (args, shared)) as pool:
            for _ in pool.imap_unordered(run_job, jobs(args)):
                write_outputs(args.out, read_runs(runs_file))
    write_outputs(args.out, read_runs(runs_file))
    logger.info("done in %.0f s; outputs in %s", time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
