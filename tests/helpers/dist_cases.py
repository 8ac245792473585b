"""Multi-process cases for tests/engine/test_distributed.py: each runs in every rank of a process group spawned by
:func:`spawn` and returns rank 0's result, so a test compares it with the same case run in the test's own
process, where no process group exists (a one-process run).

Device: the CPU with ``gloo`` (one thread per process) unless FASTUNLEARN_TEST_DIST_DEVICE=cuda, then one
GPU per rank with ``nccl`` (benchmarks/gpu_check.sh does that on a machine with 2+ GPUs)."""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.lora.fila import fila_init
from fastunlearn.lora.fisher import empirical_fisher
from fastunlearn.ops.lowrank import weighted_lowrank_grouped
from fastunlearn.utils import distributed as dist_utils
from tests.helpers.tiny_models import VOCAB, tiny_model

DEVICE = os.environ.get("FASTUNLEARN_TEST_DIST_DEVICE", "cpu")


def device() -> torch.device:
    """This rank's device (cuda:rank on GPUs; the one-process run uses cuda:0)."""
    return torch.device("cuda", dist_utils.current().rank) if DEVICE == "cuda" else torch.device("cpu")


def token_data(n: int, seed: int, pad: bool = True) -> dict[str, torch.Tensor]:
    """(n, 12) token ids; with ``pad``, every third sequence right-padded after 7 tokens."""
    ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[::3, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------------
# Cases: (work dir, **options) -> name -> tensor (rank 0's return value is the result)
# ---------------------------------------------------------------------------------------------------------
def fisher_case(work: Path, mode: str, own_shards: bool, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Fisher of a tiny GPT-Neo on 10 sequences in batches of 3 (4 batches: uneven over 2 ranks).
    ``own_shards``: each rank passes its own batches as an iterable instead of the whole tensor."""
    model = tiny_model("gpt_neo").to(device(), dtype)
    data = token_data(10, seed=3)
    if own_shards:
        process = dist_utils.current()
        starts = range(0, 10, 3)
        data = [{k: v[s : s + 3] for k, v in data.items()} for s in starts]
        data = [data[i] for i in dist_utils.owned(len(data), process)]
    result = empirical_fisher(model, data, "preset", mode=mode, batch_size=3, progress=False)
    counts = torch.tensor([result.n_examples, result.n_tokens])
    return {**{k: v.cpu() for k, v in result.fisher.items()}, "counts": counts}


def lowrank_case(work: Path) -> dict[str, torch.Tensor]:
    """Seven layers of three shapes, factored at rank 4."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(24, 16), (24, 16), (16, 40), (24, 16), (16, 40), (32, 8), (24, 16)]
    weights = {f"layer{k}": torch.randn(shape, generator=gen).to(device()) for k, shape in enumerate(shapes)}
    rows = {name: torch.rand(W.shape[0], generator=gen).to(device()) for name, W in weights.items()}
    result = weighted_lowrank_grouped(weights, rows, 4, max_batch_bytes=2 * 24 * 16 * 4, progress=False)
    return {f"{name}.{part}": t.cpu() for name, low in result.items() for part, t in zip("USV", low)}


def fila_case(work: Path) -> dict[str, torch.Tensor]:
    """FILA adapters of a float64 tiny GPT-Neo (forget 6, retain 10 sequences)."""
    model = tiny_model("gpt_neo").double().to(device())
    fila_init(model, token_data(6, seed=7), token_data(10, seed=8), "preset", rank=4, alpha=8.0, batch_size=4)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora" in k or "base.weight" in k}


def qa_rows(ids: torch.Tensor) -> SequenceSet:
    """``ids`` as question/answer rows: labels -100 on each row's first 2 + i % 4 tokens (the prompt) and on
    padding (the last 2 tokens of every third row)."""
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for i in range(len(ids)):
        labels[i, : 2 + i % 4] = -100
    return SequenceSet(ids, mask, torch.arange(len(ids)), labels)


def unlearn_case(
    work: Path, config: dict, interrupt_at: int | None = None, qa: bool = False
) -> dict[str, torch.Tensor]:
    """An unlearning run of the memorizer saved in ``work``; rank 0 returns its log (as JSON bytes) and
    the merged model it wrote. ``interrupt_at``: stop the run by an error after that epoch (checkpoint kept).
    ``qa``: every set read as question/answer rows (``qa_rows``: labels, padding)."""
    model = _load_model(work).to(device())
    as_set = qa_rows if qa else (lambda v: SequenceSet(v, torch.ones_like(v), torch.arange(len(v))))
    sets = {k: as_set(v) for k, v in load_file(work / "data.st").items()}
    data = UnlearningData(sets["forget"], sets["retain"], sets["heldout"])

    def interrupt(task: int, record: dict) -> None:
        if record["epoch"] == interrupt_at:
            raise KeyboardInterrupt

    try:
        result = unlearn(model, data, UnlearnConfig(**config), work / "run", on_epoch_end=interrupt)
    except KeyboardInterrupt:
        return {"interrupted": torch.ones(1)}
    if not dist_utils.current().is_main:
        return {}
    log = torch.frombuffer(bytearray(json.dumps(result.log).encode()), dtype=torch.uint8)
    return {"log": log, **load_file(work / "run" / "merged" / "model.safetensors")}  # written by rank 0


def lockstep_case(work: Path) -> dict[str, torch.Tensor]:
    """Rank r makes r + 1 forward calls of an FSDP-sharded tiny GPT-Neo inside ``lockstep`` (one process:
    both ranks' calls, unsharded); returns the logits of every call, in (rank, call) order."""
    from torch.distributed.fsdp import fully_shard

    from fastunlearn.engine import parallel

    model = tiny_model("gpt_neo").to(device())
    process = dist_utils.current()
    calls = {(rank, k): token_data(2, seed=10 * rank + k)["input_ids"] for rank in range(2) for k in range(rank + 1)}
    if process.distributed:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    mine = [key for key in calls if key[0] == process.rank or not process.distributed]
    with torch.no_grad(), parallel.lockstep(model):
        logits = {key: model(input_ids=calls[key].to(device())).logits.cpu() for key in mine}
    rows = torch.stack([logits.get(key, torch.zeros(2, 12, VOCAB)) for key in calls])  # (calls, 2, 12, V)
    index = torch.tensor([i for i, key in enumerate(calls) if key in logits])
    return {"logits": dist_utils.gather_rows(rows[index], index, len(calls))}


def _load_model(work: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(work / "model")


def numerics_case(work: Path) -> dict[str, torch.Tensor]:
    """Every Fisher variant, the low-rank factors and FILA's adapters in one go (a spawn costs seconds)."""
    results = {}
    for mode in ("per_example", "per_batch"):
        for own_shards in (False, True):
            fisher = fisher_case(work, mode, own_shards)
            results.update({f"fisher.{mode}.{own_shards}.{k}": v for k, v in fisher.items()})
        results.update({f"fisher32.{mode}.{k}": v for k, v in fisher_case(work, mode, False, torch.float32).items()})
    results.update({f"lowrank.{k}": v for k, v in lowrank_case(work).items()})
    results.update({f"fila.{k}": v for k, v in fila_case(work).items()})
    return results


CASES = {"numerics": numerics_case, "unlearn": unlearn_case, "lockstep": lockstep_case}


# ---------------------------------------------------------------------------------------------------------
# Spawning
# ---------------------------------------------------------------------------------------------------------
def _entry(rank: int, world_size: int, case: str, work: str, options: dict) -> None:
    work_dir = Path(work)
    try:
        torch.set_num_threads(1)
        if DEVICE == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{work_dir / 'rendezvous'}", rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=120),  # a hang becomes an error
        )  # fmt: skip
        result = CASES[case](work_dir, **options)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result.items()}, str(work_dir / "result.st"))
        dist.destroy_process_group()
    except BaseException:
        (work_dir / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def spawn(case: str, work: Path, world_size: int = 2, **options) -> dict[str, torch.Tensor]:
    """Run CASES[case] in ``world_size`` fresh processes; rank 0's result (an error's traceback is re-raised)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "rendezvous").unlink(missing_ok=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the children, as in the test process
    try:
        mp.spawn(_entry, args=(world_size, case, str(work), options), nprocs=world_size)
    except mp.ProcessRaisedException as exc:
        errors = "\n".join(p.read_text() for p in sorted(work.glob("error*.txt")))
        raise AssertionError(f"case {case!r} failed in a child process:\n{errors or exc}") from None
    return load_file(work / "result.st")


def run_here(case: str, work: Path, **options) -> dict[str, torch.Tensor]:
    """The same case in this process, without a process group: the one-process result."""
    assert not dist.is_initialized()
    return CASES[case](work, **options)
