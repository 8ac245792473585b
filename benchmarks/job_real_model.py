"""A whole unlearning job, timed phase by phase: FILA + IHL on SmolLM2-135M-Instruct (CPU), and the toy demo.

    python benchmarks/job_real_model.py job --mode before   # evaluation every epoch, retain Fisher on 128 blocks
    python benchmarks/job_real_model.py job --mode after    # the defaults: evaluation the stop rule needs
    python benchmarks/job_real_model.py toy --mode before|after
    python benchmarks/job_real_model.py fisher-sweep        # row weights and epochs vs the retain Fisher's sample
    python benchmarks/job_real_model.py gpu-7b --out DIR    # CUDA: the job at Llama-2-7B's shape (gpu_check.sh)

The job (``job``): 8 TDEC sequences of 64 tokens (the first 8 of lm_extraction_32_0) memorized by a short full
fine-tune of SmolLM2-135M-Instruct (``benchmarks/paper/table1_real.py --forget-sets lm_extraction_32_0
--memorized-size 8``'s cached model: made once, not timed),
then unlearned with FILA (rank 16) + IHL + retain loss until the forget MA and EL_10 reach the held-out set's
(the first 16 of lm_extraction_32_2; its values before unlearning read from the engine's cache, primed once, not
timed). Retain set: WikiText in 64-token blocks (all but the last 128); utility sets: the last 128 WikiText blocks
and the Pile (the last 150 documents in 64-token blocks); retain and utility perplexities on at most 128 blocks
each (``eval_retain_max``), as ``fastunlearn unlearn --retain ... --utility ... --heldout ...`` runs it.

- ``--mode before``: the engine's behaviour before ``eval_every``: perplexities after every epoch
  (``eval_every=1``) and FILA's retain Fisher on 128 blocks;
- ``--mode after``: the defaults (perplexities before and after the task only, the default Fisher sample).

Each writes ``<mode>.json`` (``toy-<mode>.json``) under ``--out``: wall seconds ``total_s`` (model load, the
engine's phases from its log, export), CPU seconds (``resource.getrusage``: user + system of this process), the
load average before and after (the cores may be shared), epochs to the criterion and the final numbers.

``fisher-sweep``: the retain Fisher on nested seeded samples of 16, 32, 64 and 128 retain blocks (the engine's
``fisher_sample``: a smaller sample is a subset of a larger one, so each Fisher extends the last one's sum with the
new rows), each layer's FILA row weights compared with those from 128 blocks (Spearman rank correlation; mean and
minimum over the layers), and one engine run per sample size for the epochs to the criterion (no perplexities;
FILA is handed the Fisher computed here instead of computing it again). Written to ``fisher-sample.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "paper"))
OUT = REPO / "benchmarks" / "results" / "job-real-model"
DATA = REPO.parent / "shared" / "data" / "tdec"  # as benchmarks/paper/table1.py; --data to change it
CACHE = Path.home() / ".cache" / "fastunlearn"
UTILITY_BLOCKS = 128
SIZES = (16, 32, 64, 128)
logger = logging.getLogger("job_real_model")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())}


def load_data(tokenizer, data_dir: Path = DATA) -> dict:
    """The job's sets (see the module docstring) and the memorization data of table1_real's cached model."""
    import table1_real

    from fastunlearn.data.text import UnlearningData, tokenize_sequences

    argv = ["--data", str(data_dir), "--cache", str(CACHE), "--forget-sets", "lm_extraction_32_0"]
    args = table1_real.parse_args([*argv, "--memorized-size", "8"])
    args.device = "cpu"
    sets = table1_real.load(args, tokenizer)
    texts = table1_real._texts
    wiki = tokenize_sequences(texts(data_dir / "utility" / "wikitext.csv"), tokenizer, seq_len=args.seq_len,
                              mode="pack", role="wikitext")  # fmt: skip
    pile = tokenize_sequences(texts(data_dir / "utility" / "pile.csv")[-150:], tokenizer, seq_len=args.seq_len,
                              mode="pack", role="pile")  # fmt: skip
    n = len(wiki) - UTILITY_BLOCKS
    utility = {"wikitext": wiki[list(range(n, len(wiki)))], "pile": pile[list(range(min(UTILITY_BLOCKS, len(pile))))]}
    data = UnlearningData(sets["forget"]["lm_extraction_32_0"], wiki[list(range(n))], sets["heldout"], utility)
    return {"args": args, "sets": sets, "data": data}


def memorized_folder(loaded: dict) -> Path:
    import table1_real

    return table1_real.memorized(loaded["args"], loaded["sets"])


def job_config(mode: str, **overrides):
    from fastunlearn.engine import UnlearnConfig

    before = {"eval_every": 1, "fisher_max_examples": 128} if mode == "before" else {}
    settings = {"params": "fila", "rank": 16, "alpha": 32.0, "forget_loss": "ihl", "max_epochs": 20,
                "eval_retain_ppl": True, "micro_batch_size": 8, "eval_batch_size": 32}  # fmt: skip
    return UnlearnConfig(**{**settings, **before, **overrides})


def prime_heldout_cache(model, data, cfg) -> bool:
    """Measure and store the held-out set's values before unlearning unless the engine's cache has them (a job
    reads them from there); True when they were there."""
    import torch

    from fastunlearn.engine import evaluation
    from fastunlearn.engine.cache import HeldoutCache
    from fastunlearn.engine.inputs import model_fingerprint

    cache = HeldoutCache(model_fingerprint(model), data.heldout, cfg, torch.device("cpu"))
    if cache.load() is not None:
        return True
    values = evaluation.measure(model, data.heldout, cfg, phase="priming the cache: held-out set")
    cache.store(values, len(data.heldout))
    return False


def summary(result, wall: dict) -> dict:
    log = result.log
    task = log["tasks"][0]
    return {
        "success": result.success,
        "epochs": len(task["epochs"]),
        "criterion": log["criterion"],
        "baseline": log["baseline"],
        "after": task["after"],
        "curve_ma": [e["forget_ma"] for e in task["epochs"]],
        "engine_timings": log["timings"],
        "fisher_retain_sequences": log["data"]["fisher_retain_sequences"],
        "baseline_cache_hit": (log.get("baseline_cache") or {}).get("hit"),
        "eval_every": log["config"]["eval_every"],
        **wall,
    }


def run_job(mode: str, out: Path, data_dir: Path = DATA) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.engine import unlearn

    _, tokenizer = real_model()
    loaded = load_data(tokenizer, data_dir)
    folder = memorized_folder(loaded)
    cfg = job_config(mode)
    primed = prime_heldout_cache(AutoModelForCausalLM.from_pretrained(folder), loaded["data"], cfg)
    run_dir = CACHE / "job-real-model-run" / mode
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run directory
    load_before, cpu0, t0 = os.getloadavg(), cpu_s(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    load_s = time.perf_counter() - t0
    result = unlearn(model, loaded["data"], cfg, run_dir, tokenizer=tokenizer)
    total = time.perf_counter() - t0
    row = summary(result, {"mode": mode, "total_s": total, "model_load_s": load_s, "cpu_s": cpu_s() - cpu0,
                           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                           "heldout_cache_was_primed": primed, "machine": machine(),
                           "torch": torch.__version__})  # fmt: skip
    shutil.rmtree(run_dir)
    write(out / f"{mode}.json", row)
    return row


def run_toy(mode: str, out: Path) -> dict:
    from dataclasses import replace

    from fastunlearn.demo import toy
    from fastunlearn.demo.data import make_records
    from fastunlearn.engine import unlearn

    cfg = toy.DemoConfig()
    records = make_records(cfg.seed, cfg.sizes)
    with toy.one_thread():
        model, tokenizer, _ = toy.memorized_model(cfg, records)
        data = toy.tokenize_records(records, tokenizer, cfg.seq_len)
        config = toy.unlearn_config(cfg)
        if mode == "before":
            config = replace(config, eval_every=1, fisher_max_examples=128)
        run_dir = CACHE / "job-real-model-run" / f"toy-{mode}"
        shutil.rmtree(run_dir, ignore_errors=True)
        unlearn(model, data, config, run_dir / "warm")  # the held-out cache and lazy imports, not timed
        model, tokenizer, _ = toy.memorized_model(cfg, records)
        load_before, cpu0, t0 = os.getloadavg(), cpu_s(), time.perf_counter()
        result = unlearn(model, data, config, run_dir / "run", tokenizer=tokenizer)
        total = time.perf_counter() - t0
        row = summary(result, {"mode": mode, "total_s": total, "cpu_s": cpu_s() - cpu0,
                               "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                               "machine": machine()})  # fmt: skip
    shutil.rmtree(run_dir)
    write(out / f"toy-{mode}.json", row)
    return row


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D tensors (ranks by argsort; ties are rare in float32 sums)."""
    import torch

    ra = torch.empty_like(a, dtype=torch.float64)
    rb = torch.empty_like(b, dtype=torch.float64)
    ra[a.argsort()] = torch.arange(len(a), dtype=torch.float64)
    rb[b.argsort()] = torch.arange(len(b), dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def fisher_sweep(out: Path, data_dir: Path = DATA, runs: tuple[int, ...] = (32, 16, 64, 128)) -> dict:
    """Row weights and epochs to the criterion for each retain Fisher sample size (module docstring); the engine
    runs only for the sizes in ``runs`` (``--runs``), the row weights always for all."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.engine import unlearn
    from fastunlearn.engine.inputs import batch
    from fastunlearn.engine.params import fisher_sample
    from fastunlearn.lora import fila
    from fastunlearn.lora.fila import row_weights_from_fisher
    from fastunlearn.lora.fisher import FisherResult, empirical_fisher, relative_fisher
    from fastunlearn.lora.targets import find_targets

    _, tokenizer = real_model()
    loaded = load_data(tokenizer, data_dir)
    folder, data = memorized_folder(loaded), loaded["data"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    modules = find_targets(model, "preset")
    names = list(modules)
    forget = empirical_fisher(model, batch(data.forget), names)
    cfg = job_config("after")
    order = torch.randperm(len(data.retain), generator=torch.Generator().manual_seed(cfg.seed))  # fisher_sample's
    fishers, state = {}, {"total": {k: 0 for k in names}, "seen": 0, "seconds": 0.0}

    def retain_fisher(n: int) -> FisherResult:
        """F_r of fisher_sample(retain) with n sequences: the nested samples' sum extended by the new rows."""
        if n not in fishers:
            sample = fisher_sample(data.retain, job_config("after", fisher_max_examples=n))
            assert torch.equal(sample.input_ids, data.retain.input_ids[order[:n].sort().values])  # the engine's
            t0 = time.perf_counter()
            part = empirical_fisher(model, batch(data.retain[order[state["seen"] : n].sort().values]), names)
            state["total"] = {k: state["total"][k] + part.fisher[k] * part.n_examples for k in names}
            state["seen"] += part.n_examples
            state["seconds"] += time.perf_counter() - t0
            fishers[n] = FisherResult({k: v / n for k, v in state["total"].items()}, n, 0, "per_example")
        return fishers[n]

    def cached(_model, data_given, targets, **kwargs) -> FisherResult:  # fila_init's Fisher, from the above
        rows = len(data_given["input_ids"])
        return forget if torch.equal(data_given["input_ids"], data.forget.input_ids) else retain_fisher(rows)

    report = {"sizes": list(SIZES), "layers": len(names), "forget_sequences": len(data.forget),
              "retain_sequences": len(data.retain)}  # fmt: skip
    no_ppl = type(data)(data.forget, data.retain, data.heldout)
    for n in SIZES:  # the row weights first: Spearman against the 128-block Fisher's, per layer
        retain_fisher(n)
        logger.info("retain Fisher on %d blocks: %.0f s so far", n, state["seconds"])
    weights = {m: row_weights_from_fisher(relative_fisher(forget, f, cfg.fila_config().eps), modules)
               for m, f in fishers.items()}  # fmt: skip
    for m in SIZES:
        rho = [spearman(weights[m][k], weights[SIZES[-1]][k]) for k in names]
        report[str(m)] = {"spearman_mean": sum(rho) / len(rho), "spearman_min": min(rho)}
    report["retain_fisher_s"] = state["seconds"]
    write(out / "fisher-sample.json", {**report, "machine": machine()})
    for n in runs:  # then the epochs to the criterion, the likely default first (each row written)
        run_dir = CACHE / "job-real-model-run" / f"fisher-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = job_config("after", fisher_max_examples=n, eval_retain_ppl=False)
        t0 = time.perf_counter()
        with mock.patch.object(fila, "empirical_fisher", cached):
            result = unlearn(AutoModelForCausalLM.from_pretrained(folder), no_ppl, config, run_dir)
        task = result.log["tasks"][0]
        report[str(n)].update(epochs=len(task["epochs"]), success=result.success,
                              curve_ma=[e["forget_ma"] for e in task["epochs"]], after=task["after"]["forget"][0],
                              run_s=time.perf_counter() - t0)  # fmt: skip
        shutil.rmtree(run_dir)
        write(out / "fisher-sample.json", {**report, "machine": machine()})
        logger.info("retain Fisher on %d blocks: %s", n, report[str(n)])
    return report


def gpu_7b(out: Path, epochs: int = 5) -> dict:
    """The job at a GPU's scale: random weights of Llama-2-7B's shape in bfloat16, 32 x 200 forget tokens (random
    ids), 128 retain and 32 held-out sequences of 200, a 128-sequence utility set, FILA rank 16 + IHL, exactly
    ``epochs`` epochs (min_epochs = max_epochs: the held-out criterion is checked every epoch, so EL_10 is measured
    once MA meets it, as a real job pays). Random weights memorize nothing: this times the job, it unlearns nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastunlearn.data.text import SequenceSet, UnlearningData
    from fastunlearn.engine import unlearn

    def random_set(n: int, seed: int) -> SequenceSet:
        ids = torch.randint(0, 32000, (n, 200), generator=torch.Generator().manual_seed(seed))
        return SequenceSet(ids, torch.ones_like(ids), torch.arange(n))

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    data = UnlearningData(random_set(32, 0), random_set(128, 1), random_set(32, 2), {"random": random_set(128, 3)})
    cfg = job_config("after", dtype="bfloat16", min_epochs=epochs, max_epochs=epochs, micro_batch_size=8,
                     cache_heldout_baseline=False)  # fmt: skip
    run_dir = out / "gpu-7b-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = unlearn(model, data, cfg, run_dir)
    row = {"what": "Llama-2-7B shape, random bf16 weights, 32 x 200 forget, FILA r16 + IHL", "epochs": epochs,
           "build_s": build_s, "total_s": time.perf_counter() - t0, "engine_timings": result.log["timings"],
           "epoch_train_s": [e["train_s"] for t in result.log["tasks"] for e in t["epochs"]],
           "epoch_eval_s": [e["eval_s"] for t in result.log["tasks"] for e in t["epochs"]],
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name()}  # fmt: skip
    shutil.rmtree(run_dir)
    write(out / "gpu-7b.json", row)
    return row


def write(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("job", "toy", "fisher-sweep", "gpu-7b"))
    parser.add_argument("--mode", choices=("before", "after"), default="after")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--data", type=Path, default=DATA, help="TDEC's folder (forget/, utility/)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (job, fisher-sweep)")
    parser.add_argument("--runs", type=int, nargs="+", default=[32, 16, 64, 128], choices=SIZES,
                        help="fisher-sweep: the sample sizes run to the criterion")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    from fastunlearn.engine.progress import log_to_terminal

    torch.set_num_threads(args.threads)
    log_to_terminal()
    logging.basicConfig(level=logging.INFO)
    if args.what in ("fisher-sweep", "gpu-7b"):
        row = fisher_sweep(args.out, args.data, tuple(args.runs)) if args.what == "fisher-sweep" else gpu_7b(args.out)
        print(json.dumps(row, default=str))
        return 0
    row = run_job(args.mode, args.out, args.data) if args.what == "job" else run_toy(args.mode, args.out)
    print(json.dumps({k: row[k] for k in ("mode", "total_s", "cpu_s", "epochs", "success", "engine_timings")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
