"""Empirical Fisher information of a causal LM's target layers (Cha et al., arXiv 2408.06621, FILA).

Loss of sequence n: L_n = sum_t NLL(x_{t+1} | x_{<=t}), the sequence's negative log-likelihood (one-token
shift; a target is left out when it is padding, when it is predicted from a padded position, or when its
label is ``ignore_index``). Two estimators of the diagonal Fisher of each target weight W:

- ``per_example`` (the paper's Eq. 2): F = (1/N) sum_n (dL_n/dW)^2, returned normalized by N.
- ``per_batch`` (the official code's estimator, for reproduction): for each mini-batch b with n_b label
  tokens, g_b = d(mean token NLL of b)/dW and F = sum_b n_b g_b^2, returned *unnormalized* together with
  n_tokens = sum_b n_b; the official code then uses F / n_tokens (see :func:`relative_fisher`).

How: one forward and one backward of sum_n L_n per batch, with the model in eval mode (no dropout).
Forward hooks on the target layers keep their inputs X (B, T, in) and route each output through
``output + probe`` (a zero scalar leaf) whose gradient hook receives G = dL/dY (B, T, out) during
``torch.autograd.grad(loss, probes)``: no parameter gradient is computed or stored, frozen models work,
and each G is consumed as soon as backward produces it. The examples of a causal LM's batch do not
interact, so G_n is example n's own gradient and dL_n/dW = G_n^T X_n. ``per_example`` accumulates
sum_n (G_n^T X_n)^2 without forming the (B, out, in) per-example gradients: the fused Triton kernel
(``fastunlearn.kernels.fisher``) on CUDA, chunked bmm (``_fisher_torch``) otherwise. ``per_batch`` takes
one (out, in) matmul per layer and batch. The model runs in its own dtype; F is float32 (float64 for a
float64 model).

Summation: each batch's contribution is computed into a scratch tensor, then added to a running sum with
its rounding error kept apart (TwoSum; one extra F-sized buffer); a layer's first batch is computed straight
into its running sum (the same bits: TwoSum of a zero sum and a term is the term, exactly). The result is the
sum of the batches' contributions rounded once, whatever order or grouping they were added in, so a run split
over processes gives the same bits as a one-process run (unless the exact sum lies within about
n_batches x 2^-53 of a rounding tie: never seen in practice). Multi-process (a ``torch.distributed`` process group is
initialized): data given as a tensor or dict is split into batches and rank r takes batches r,
r + world_size, ...; an iterable of batches is taken as this rank's own share (e.g. from a
``DistributedSampler``). The ranks' sums are then added (float32: one float64 all-reduce of sum + error;
float64: the (sum, error) pairs are gathered and added with TwoSum in rank order) and the counts
all-reduced: every rank returns the same result. ``distributed=False`` keeps a rank's result to itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastunlearn.data.labels import next_token_targets
from fastunlearn.lora.targets import find_targets, is_conv1d
from fastunlearn.ops import dispatch
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils import validate

MODES = ("per_example", "per_batch")
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class FisherConfig:
    """Options of :func:`empirical_fisher`. ``chunk_mb``: temporary budget of the torch per-example path."""

    mode: str = "per_example"
    batch_size: int = 8
    max_examples: int | None = None
    ignore_index: int = -100
    chunk_mb: float = 256.0
    progress: bool = True

    def __post_init__(self) -> None:
        validate.check_choice("mode", self.mode, MODES)
        validate.check_int("batch_size", self.batch_size, 1)
        if self.max_examples is not None:
            validate.check_int("max_examples", self.max_examples, 1)
        validate.check_int("ignore_index", self.ignore_index)
        validate.check_number("chunk_mb", self.chunk_mb, 0, strict=True)


@dataclass
class FisherResult:
    fisher: dict[str, Tensor]  # layer name -> float32 tensor of the weight's shape ((in, out) for Conv1D)
    n_examples: int  # sequences seen (those whose targets are all ignored included)
    n_tokens: int  # label tokens that entered the loss
    mode: str


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def _as_batch(batch: object, where: str) -> dict[str, Tensor]:
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"{where} must be a LongTensor of input_ids (N, T) or a dict with 'input_ids', got {type(batch).__name__}"
        )
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
        what = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{where}['input_ids'] must be an integer tensor (N, T), got a {what}")
    if ids.shape[1] < 2:
        raise ValueError(f"{where}['input_ids'] has sequences of {ids.shape[1]} token(s); next-token NLL needs >= 2")
    for key in BATCH_KEYS[1:]:
        if batch.get(key) is not None and tuple(batch[key].shape) != tuple(ids.shape):
            raise ValueError(
                f"{where}[{key!r}] has shape {tuple(batch[key].shape)} but input_ids has {tuple(ids.shape)}"
            )
    return {key: batch[key] for key in BATCH_KEYS if batch.get(key) is not None}


def _batches(
    data: object, cfg: FisherConfig, process: dist_utils.Process
) -> tuple[Iterator[dict[str, Tensor]], int | None]:
    """(this rank's batches, cut at max_examples; their number when known)."""
    if isinstance(data, (Tensor, Mapping)):
        full = _as_batch(data, "data")
        n = full["input_ids"].shape[0] if cfg.max_examples is None else min(cfg.max_examples, len(full["input_ids"]))
        starts = range(0, n, cfg.batch_size)
        mine = [starts[i] for i in dist_utils.owned(len(starts), process)]
        return ({k: v[s : min(s + cfg.batch_size, n)] for k, v in full.items()} for s in mine), len(mine)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a LongTensor, a dict or an iterable of batches, got {type(data).__name__}")

    def cut() -> Iterator[dict[str, Tensor]]:
        left = cfg.max_examples
        for i, batch in enumerate(data):
            batch = _as_batch(batch, f"data[{i}]")
            if left is not None:
                batch = {k: v[:left] for k, v in batch.items()}
                left -= len(batch["input_ids"])
            yield batch
            if left == 0:
                return

    return cut(), len(data) if hasattr(data, "__len__") else None


def _sequence_nll(model: nn.Module, batch: dict[str, Tensor], ignore_index: int) -> tuple[Tensor, int]:
    """(sum over the batch of each sequence's NLL, in the model's dtype and at least float32; number of label
    tokens). The targets are :func:`fastunlearn.losses.next_token_targets` (labels aligned with input_ids)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    targets = next_token_targets(ids, mask, batch.get("labels"), ignore_index)  # (B, T - 1)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, T - 1, V)
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # a float64 model keeps float64
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return nll, int((targets != ignore_index).sum())


# ---------------------------------------------------------------------------------------------------------
# Hooks and accumulation
# ---------------------------------------------------------------------------------------------------------
class _Taps:
    """Forward hooks handing each target layer's (X, G) of a batch to ``consume(name, x, g)`` in backward."""

    def __init__(self, modules: dict[str, nn.Module], consume: Callable[[str, Tensor, Tensor], None]) -> None:
        self.consume = consume
        self.inputs: dict[str, Tensor] = {}
        self.probes: list[Tensor] = []
        self.ran: set[str] = set()
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in self.ran:
                raise RuntimeError(f"target layer {name!r} ran twice in one forward pass; Fisher needs one call")
            self.ran.add(name)
            self.inputs[name] = args[0].detach()
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self.probes.append(probe)
            tapped = output + probe  # a new tensor: in-place use downstream stays legal
            tapped.register_hook(lambda grad: self.consume(name, self.inputs.pop(name), grad))
            return tapped

        return hook

    def backward(self, loss: Tensor, names: Iterable[str]) -> None:
        missing = [name for name in names if name not in self.ran]
        if missing:
            raise RuntimeError(f"target layers {missing} did not run in the model's forward pass")
        torch.autograd.grad(loss, self.probes, allow_unused=True)  # hooks consume G; probe grads are dropped

    def reset(self) -> None:
        self.inputs.clear()
        self.probes.clear()
        self.ran.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.reset()


def accumulate_per_example(fisher: Tensor, x: Tensor, g: Tensor, chunk_bytes: int, impl: str | None = None) -> None:
    """fisher (out, in) float32 += sum_n (g_n^T x_n)^2 for x (B, T, in), g (B, T, out) on the registry's ``fisher``
    op (``impl``: "torch" or "triton"; None: automatic). The Triton kernel takes float32/bfloat16/float16 (float64
    models run the torch path)."""
    impl = dispatch.select("fisher", x.device, dtypes=(x.dtype, g.dtype, fisher.dtype), impl=impl)
    accumulate = dispatch.implementation("fisher", impl)
    if impl == "triton":
        dtype = torch.promote_types(x.dtype, g.dtype)  # autocast: float32 input, half output gradient
        accumulate(fisher, x.to(dtype), g.to(dtype))
    else:
        accumulate(fisher, x, g, chunk_bytes=chunk_bytes)


def _two_sum_(total: Tensor, error: Tensor, term: Tensor) -> None:
    """total + error += term, with total + term rounded and its exact rounding error added to ``error``
    (Knuth's TwoSum: s = total + term, b = s - total, err = (total - (s - b)) + (term - b)). ``term`` is
    scratch: it is overwritten."""
    s = total + term
    b = s - total
    term.sub_(b)  # term - b
    b.neg_().add_(s).neg_().add_(total)  # total - (s - b)
    error.add_(b).add_(term)
    total.copy_(s)


def _reduce_compensated(total: Tensor, error: Tensor, reduce: bool) -> Tensor:
    """total + error, summed over the ranks when ``reduce``, rounded once; the same on every rank.

    float32: sum + error of each rank is (nearly) exact in float64, so ONE float64 all-reduce adds the ranks'
    parts with an error far below float32's resolution before the single rounding. float64: every rank's
    (sum, error) pair is gathered and the pairs are added in rank order with TwoSum, then rounded once.
    """
    if not reduce:
        return total.add_(error)
    device = dist_utils.comm_device()
    if total.dtype == torch.float32:
        wide = total.to(device, torch.float64).add_(error.to(device, torch.float64))
        torch.distributed.all_reduce(wide)
        return total.copy_(wide)
    pairs = torch.stack([total, error]).to(device)  # (2, *shape)
    gathered = [torch.empty_like(pairs) for _ in range(dist_utils.current().world_size)]
    torch.distributed.all_gather(gathered, pairs)
    s, c = torch.zeros_like(pairs[0]), torch.zeros_like(pairs[0])
    for part in gathered:
        _two_sum_(s, c, part[0])
        _two_sum_(s, c, part[1])
    return total.copy_(s.add_(c))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------
def empirical_fisher(
    model: nn.Module,
    data: Tensor | Mapping[str, Tensor] | Iterable[Mapping[str, Tensor] | Tensor],
    targets: str | Iterable[str],
    *,
    mode: str = "per_example",
    batch_size: int = 8,
    max_examples: int | None = None,
    ignore_index: int = -100,
    chunk_mb: float = 256.0,
    progress: bool = True,
    distributed: bool | None = None,
    impl: str | None = None,
) -> FisherResult:
    """Diagonal empirical Fisher of every target layer's weight (see the module docstring for both modes).

    ``data``: input_ids (N, T), a dict {"input_ids", optional "attention_mask", optional "labels"} (split
    into ``batch_size`` rows), or an iterable of such batches (used as given). ``labels`` are aligned with
    input_ids as in Hugging Face (the shift happens here). ``targets``: layer patterns or a preset
    (``fastunlearn.lora.targets``). The model's train/eval modes, parameters and their ``requires_grad`` and
    ``.grad`` are left as they were. ``distributed``: reduce over the default process group (None: when
    one is initialized; see the module docstring). ``impl``: the per-example accumulation's implementation
    ("torch" or "triton"; None: automatic).
    """
    cfg = FisherConfig(mode, batch_size, max_examples, ignore_index, chunk_mb, progress)
    process = dist_utils.resolve(distributed)
    modules = find_targets(model, targets)
    dtypes = {name: torch.promote_types(m.weight.dtype, torch.float32) for name, m in modules.items()}
    fisher = {
        name: torch.zeros(m.weight.shape, dtype=dtypes[name], device=m.weight.device) for name, m in modules.items()
    }
    errors = {name: torch.zeros_like(f) for name, f in fisher.items()}  # rounding errors of the running sums
    started: set[str] = set()  # layers whose running sum holds a batch's contribution
    chunk_bytes = int(cfg.chunk_mb * 2**20)

    def consume(name: str, x: Tensor, g: Tensor) -> None:
        n_rows = g.shape[0]
        if x.shape[0] != n_rows:
            raise RuntimeError(f"target layer {name!r} sees input {tuple(x.shape)}: the batch must be dimension 0")
        x, g = x.reshape(n_rows, -1, x.shape[-1]), g.reshape(n_rows, -1, g.shape[-1])  # (B, T, in), (B, T, out)
        # this batch's contribution; a layer's first goes straight into its (zero) running sum: TwoSum(0, 0, term)
        # is (term, 0) exactly (terms are sums of squares, never -0), so the bits are those of the compensated sum
        first = name not in started
        term = fisher[name] if first else torch.zeros_like(fisher[name])
        term_out_in = term.t() if is_conv1d(modules[name]) else term  # (out, in)
        if cfg.mode == "per_example":
            accumulate_per_example(term_out_in, x, g, chunk_bytes, impl)
        else:  # n_b g_b^2 with g_b = (sum_t g_t x_t^T) / n_b
            dtype = dtypes[name]
            summed = torch.mm(g.reshape(-1, g.shape[-1]).t().to(dtype), x.reshape(-1, x.shape[-1]).to(dtype))
            term_out_in.copy_(summed.square_().div_(batch_tokens))
        if first:
            started.add(name)
        else:
            _two_sum_(fisher[name], errors[name], term)

    device = next(model.parameters()).device
    batches, total = _batches(data, cfg, process)
    n_examples = n_tokens = 0
    taps = _Taps(modules, consume)
    try:
        with _eval_mode(model), torch.enable_grad():
            show = cfg.progress and process.is_main
            for batch in tqdm(batches, total=total, desc=f"Fisher ({cfg.mode})", disable=not show):
                loss, batch_tokens = _sequence_nll(model, {k: v.to(device) for k, v in batch.items()}, ignore_index)
                n_examples += len(batch["input_ids"])
                n_tokens += batch_tokens
                if batch_tokens:  # a batch without label tokens has zero gradients
                    taps.backward(loss, modules)
                taps.reset()
    finally:
        taps.remove()
    if process.distributed:
        n_examples, n_tokens = dist_utils.all_reduce_sum([n_examples, n_tokens])
    for name in fisher:
        _reduce_compensated(fisher[name], errors.pop(name), process.distributed)
    if n_examples == 0:
        raise ValueError("data holds no sequences")
    if n_tokens == 0:
        raise ValueError(f"every next-token target in data is padding or labelled {ignore_index}: nothing to score")
    if cfg.mode == "per_example":
        for value in fisher.values():
            value.div_(n_examples)
    return FisherResult(fisher, n_examples, n_tokens, cfg.mode)


def relative_fisher(forget: FisherResult, retain: FisherResult, eps: float = 1e-5) -> dict[str, Tensor]:
    """FILA's importance of each weight for the forget set relative to the retain set, elementwise.

    ``per_batch`` (official code): (F_f / f_tokens) / (eps + F_r / r_tokens); both are sums of n_b g_b^2, so
    dividing by the token counts puts them on one per-token scale whatever the set sizes and batch sizes.
    ``per_example`` (paper Eq. 2): F_f / (eps + F_r); both are already means over sequences, each the
    squared gradient of a whole sequence's NLL (so ``eps`` acts on a per-sequence scale, not per token).
    """
    if forget.mode != retain.mode:
        raise ValueError(f"forget and retain Fisher must share a mode, got {forget.mode!r} and {retain.mode!r}")
    if forget.mode not in MODES:
        raise ValueError(f"forget.mode must be one of {MODES}, got {forget.mode!r}")
    only_f, only_r = sorted(set(forget.fisher) - set(retain.fisher)), sorted(set(retain.fisher) - set(forget.fisher))
    if only_f or only_r:
        raise ValueError(f"forget and retain Fisher differ in layers: only in forget {only_f}, only in retain {only_r}")
    validate.check_number("eps", eps, 0)
    f_scale, r_scale = (forget.n_tokens, retain.n_tokens) if forget.mode == "per_batch" else (1, 1)
    return {
        name: (f / f_scale) / (eps + retain.fisher[name].to(f.device) / r_scale) for name, f in forget.fisher.items()
    }
