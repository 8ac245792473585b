"""DDP and FSDP2 for the unlearning engine (``fastunlearn.unlearn``): wrapping the model, gradient sync
per micro-batch, and the full (unsharded) state that checkpoints and outputs are written from.

- ``"ddp"``: ``DistributedDataParallel`` around the model; every rank keeps the whole model and the same
  trainable parameters and optimizer state, so rank 0's copy is the state.
- ``"fsdp"``: FSDP2 ``fully_shard`` on each transformer block (the classes ``_no_split_modules`` names)
  and on the model, in place; parameters become DTensor shards, and the full state is gathered to rank 0
  on the CPU (``torch.distributed.checkpoint.state_dict``) whenever a file is written.

Both average gradients over the ranks; the engine multiplies each rank's loss by the world size so the
update is that of the sum over all ranks' micro-batches, as in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastunlearn.lora.layer import inject_lora, lora_layers
from fastunlearn.utils import distributed as dist_utils

PARALLEL = ("ddp", "fsdp")
_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, the others {}


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"parallel='fsdp' shards each transformer block; {type(model).__name__} names none in "
            f"_no_split_modules ({sorted(names)}): use parallel='ddp'"
        )
    return blocks


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of the trained ones, in ``model.parameters()`` order (the optimizer's indices)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def wrap(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """The module training forwards go through: the model itself in one process, else DDP(model) or the
    model after ``fully_shard`` (in place: ``model`` is then sharded too)."""
    if not dist_utils.current().distributed:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Micro-batches before a rank's last one only accumulate; the last one's backward reduces over ranks."""
    if isinstance(train_model, DistributedDataParallel) and not enabled:
        with train_model.no_sync():
            yield
        return
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(enabled)
    yield


@contextlib.contextmanager
def lockstep(model: nn.Module) -> Iterator[None]:
    """Let each rank make its own number of forward calls of an FSDP-sharded ``model`` (no-op otherwise).

    Every FSDP forward all-gathers parameters, so all ranks must call it equally often. Within the block,
    each forward call is announced by an all-reduce of 1; after the block, a rank answers each announcement
    of the others with an all-reduce of 0 and a 2-token forward whose output it drops, until a round where no
    rank announces one. Every round is one all-reduce and one forward on every rank, in the same order (the
    hook runs before FSDP's own), so sharded evaluation (MA, EL's data-dependent decoding) cannot deadlock.
    """
    if not is_sharded(model):
        yield
        return
    draining = False
    flag = torch.zeros(1, device=dist_utils.comm_device())

    def announce(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not draining:
            flag.fill_(1)
            torch.distributed.all_reduce(flag)

    handle = model.register_forward_pre_hook(announce, prepend=True, with_kwargs=True)
    try:
        yield
        draining = True
        dummy = torch.zeros((1, 2), dtype=torch.int64, device=next(model.parameters()).device)
        with torch.no_grad():
            while True:
                flag.zero_()
                torch.distributed.all_reduce(flag)
                if not flag.item():
                    break
                model(input_ids=dummy, use_cache=False)
    finally:
        handle.remove()


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients over every shard."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """name -> full trainable tensor (on the CPU under FSDP, and only on rank 0 there)."""
    trainable = {n: p.detach() for n, p in _trainable(model).items()}
    if not is_sharded(model):
        return trainable
    state = get_model_state_dict(model, options=_FULL_ON_CPU)  # every rank must call it
    return {n: state[n] for n in trainable} if state else {}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Tensor]]:
    """Parameter index (in ``model.parameters()`` order of the trainable ones) -> full AdamW state."""
    if not is_sharded(model):
        return optimizer.state_dict()["state"]
    index = {n: i for i, n in enumerate(_trainable(model))}
    state = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU).get("state", {})
    return {index[name]: values for name, values in state.items()}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[int, dict]) -> None:
    """Load what :func:`optimizer_state` returned (every rank passes the full state, read from the file)."""
    if not is_sharded(model):
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return
    params = _trainable(model)
    names = list(params)
    full = StateDictOptions(full_state_dict=True)
    groups = get_optimizer_state_dict(model, optimizer, options=full)["param_groups"]  # state still empty: cheap
    by_name = {  # onto each parameter's device (the file's tensors are on the CPU), then sharded like it
        names[i]: {k: v.to(params[names[i]].device) if v.dim() else v for k, v in values.items()}
        for i, values in state.items()
    }
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups}, options=full)


def cpu_replica(model: nn.Module) -> nn.Module | None:
    """Rank 0: a CPU model holding the full weights of the FSDP-sharded ``model`` (transformers models, with
    their LoRA layers), to write outputs from; the other ranks get None. Every rank must call it."""
    state = get_model_state_dict(model, options=_FULL_ON_CPU)
    if not dist_utils.current().is_main:
        return None
    base_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    layers = lora_layers(model)
    with torch.device("meta"):
        replica = base_class(model.config)
        if layers:
            first = next(iter(layers.values()))
            inject_lora(replica, list(layers), first.rank, first.alpha, dropout=first.dropout_p,
                        use_rslora=first.use_rslora)  # fmt: skip
    for name, layer in lora_layers(replica).items():
        layer.lora_a0 = state.get(f"{name}.lora_a0")  # FILA's initial factors (None for plain LoRA): registered
        layer.lora_b0 = state.get(f"{name}.lora_b0")  # before loading, so the state's keys match
    replica.load_state_dict(state, assign=True)
    if hasattr(replica, "tie_weights"):
        replica.tie_weights()
    return replica.eval()
