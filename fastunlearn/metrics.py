"""Evaluation metrics of the TDEC protocol (Jang et al. 2023) as Cha et al. use them: MA, EL_n, perplexity.

For a sequence x = (x_0, ..., x_{T-1}) and a causal LM, g_t = argmax p(. | x_<t) is the greedy next token.

- **MA** (memorization accuracy): sum_{t=1}^{T-1} [g_t == x_t] / (T - 1), from one teacher-forced forward.
- **EL_n** (extraction likelihood, n = 10 by default): for each prefix length t = 1..T-1, greedily continue
  x_<t up to length T and compare the continuation's n-grams with those of the true suffix x_>=t:
  overlap_t = #(continuation n-grams, with multiplicity, in the *set* of suffix n-grams) / #(suffix n-grams).
  Prefixes whose suffix is shorter than n are skipped and EL_n = sum_t overlap_t / (T - n), as in
  joeljang/knowledge-unlearning (``validation_el``: one ``generate`` call per prefix length, the overlaps
  summed from the longest prefix down). Both EL functions do those float operations in that order, so equal
  continuations give bit-equal values. Sequences of T <= n tokens raise (no prefix is scored); a right-padded
  batch (``attention_mask``) is scored per sequence length.
  ``eos_token_id``: a continuation ends at its first EOS (kept), as ``generate`` stops there; its n-grams
  are those of the tokens up to it. (Jang et al. pad finished rows with EOS up to the batch's length, which
  adds EOS-padded n-grams that match only a suffix holding the same EOS run.) None: never stop.
- **Perplexity**: exp(sum of next-token NLL / number of predicted tokens) over a set of sequences. A sequence
  longer than ``context`` is scored in windows of ``context`` tokens starting every ``stride`` tokens; each
  window scores only the tokens after the previous window's end (the HF perplexity guide): every token but
  the first is scored once, with as much left context as the windows give (when stride < context).

**Fast EL.** One teacher-forced forward gives every g_t and the KV cache of every prefix (the keys and
values of positions < t do not depend on later tokens). If g_t == x_t, the greedy continuation of x_<t is x_t
followed by that of x_<t+1, so a continuation is x up to the next prefix t' >= t where the model deviates
(g_t' != x_t'), then the continuation of x_<t'. Only deviating prefixes are decoded, time-major: at step p
every active row feeds its token at position p over a cache of exactly p positions, and a deviating prefix
joins at p = t with the full forward's cache cut at t. So no decode batch is ever padded. Rows are decoded in
groups whose KV cache fits ``cache_mb``, in preallocated buffers written in place (a DynamicCache copies its
whole cache every step: that was 3/4 of the decode time on CPU). The continuations are then compared by exact
n-gram ids (``torch.unique``; no hashing).

Exactness: both paths take argmax of the model's logits (ties: lowest index). The full forward and the
per-prefix forwards of ``generate`` run different matrix shapes, so logits may differ in the last bits; the
continuations differ only if two logits tie to within that rounding (then ``generate`` itself depends on the
batch it runs in). Equal in the tests (fp32 CPU) and on an H200 (fp32, and bf16 on 16 x 64 tokens). The
reference calls ``generate`` with ``do_sample=False, num_beams=1``: a model whose generation config adds
logits processors (repetition penalty, ...) makes it differ from plain greedy decoding, which the fast path is.
The cache handling needs the ``Cache``/``DynamicLayer`` API of transformers 5 (run with 5.17 and 5.24).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import distributed as dist_utils

METRICS = ("ma", "el", "ppl")
# transformers 5.x renamed past_key_values (forward argument and output field) to cache
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (no dropout) without autograd; yields the model's device and restores its training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _progress(iterable, desc: str, **kwargs):
    """A progress bar on a terminal, shown by rank 0 only in a multi-process run."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if dist_utils.current().is_main else True, **kwargs)


def _check_positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _check_token_ids(name: str, ids, model: nn.Module) -> Tensor:
    """A 1-D or 2-D integer tensor of ids in [0, vocab_size); returned as int64 on the CPU."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)})")
    vocab = model.config.vocab_size
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{name} holds token ids outside [0, {vocab}) (the model's vocab_size): min {low}, max {high}")
    return ids.long().cpu()


def _check_batch(model: nn.Module, input_ids, min_tokens: int) -> Tensor:
    """(N, T) token ids with N >= 1 and min_tokens <= T <= the model's context."""
    ids = _check_token_ids("input_ids", input_ids, model)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (N, T), got {tuple(ids.shape)}")
    if ids.shape[1] < min_tokens:
        raise ValueError(f"input_ids needs at least {min_tokens} tokens per sequence, got T={ids.shape[1]}")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"input_ids has T={ids.shape[1]} tokens but the model's context is {context}")
    return ids


def memorization_accuracy(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, batch_size: int = 32
) -> Tensor:
    """MA of each sequence (N,) float64: the fraction of predicted positions t (x_t and x_{t-1} not padding)
    where argmax p(. | x_<t) == x_t. One teacher-forced forward per ``batch_size`` sequences; padding may be
    on either side (the position ids follow ``attention_mask``)."""
    ids = _check_batch(model, input_ids, 2)
    _check_positive("batch_size", batch_size)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    scored = mask[:, 1:] & mask[:, :-1]  # (N, T-1): the predicted token and the one before it are real
    empty = (scored.sum(1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"attention_mask leaves sequence {int(empty[0])} with fewer than 2 tokens: MA is undefined")
    hits = []
    with _inference(model) as device:
        for x, m in _progress(
            zip(ids.split(batch_size), mask.split(batch_size)), "MA", total=-(-len(ids) // batch_size)
        ):
            x, m, kwargs = x.to(device), m.to(device), {}
            if attention_mask is not None:
                kwargs = {"attention_mask": m.long(), "position_ids": (m.cumsum(1) - 1).clamp(min=0)}
            logits = model(input_ids=x, **kwargs).logits  # (B, T, V)
            hits.append((logits[:, :-1].argmax(-1) == x[:, 1:]).cpu())
    hits = torch.cat(hits) & scored
    return hits.sum(1).double() / scored.sum(1)


def _el_by_length(model: nn.Module, input_ids, attention_mask, n: int, eos_token_id, batch_size: int, desc: str,
                  batch_el: Callable[[Tensor], list[float]]) -> Tensor:  # fmt: skip
    """Checks the EL arguments, then fills EL (N,) float64 with ``batch_el`` of ``batch_size`` sequences of equal
    length at a time, on the model's device: padding (right side only) is removed and sequences grouped by length."""
    _check_positive("n", n)
    _check_positive("batch_size", batch_size)
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
        raise TypeError(f"eos_token_id must be an int token id or None, got {eos_token_id!r}")
    ids = _check_batch(model, input_ids, 2)
    lengths = torch.full((len(ids),), ids.shape[1])
    if attention_mask is not None:
        mask = attention_mask.cpu().bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(ids.shape[1]) < lengths[:, None]):
            raise ValueError("attention_mask must be right padding (each row ones, then zeros) for EL")
    short = (lengths <= n).nonzero().flatten()
    if len(short):
        raise ValueError(
            f"EL_n with n={n} needs sequences of at least n + 1 = {n + 1} tokens (a suffix of n tokens after a "
            f"prefix of one), sequence {int(short[0])} has {int(lengths[short[0]])}"
        )
    el = torch.empty(len(ids), dtype=torch.float64)
    with _inference(model) as device:
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().flatten()
            for chunk in _progress(rows.split(batch_size), desc, total=-(-len(rows) // batch_size)):
                el[chunk] = torch.tensor(batch_el(ids[chunk, :length].to(device)), dtype=torch.float64)
    return el


def _el_from_overlaps(hits: list[int], T: int, n: int) -> float:
    """EL_n of one sequence from hits[t - 1] (t = 1..T-n), summed from the longest prefix down like Jang et al."""
    total = 0.0
    for t in reversed(range(1, T - n + 1)):
        total += hits[t - 1] / (T - t - n + 1)  # suffix x_>=t has T - t - n + 1 n-grams
    return total / (T - n)


def extraction_likelihood_reference(
    model: nn.Module,
    input_ids: Tensor,
    n: int = 10,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """EL_n of each sequence (N,) float64 the straightforward way (Jang et al.): for each prefix length, one
    greedy ``model.generate`` call (KV cache) over ``batch_size`` sequences, n-grams as python tuples.
    T - 1 generate calls per batch. See the module docstring for the definition and the EOS convention."""

    def batch_el(x: Tensor) -> list[float]:
        T, total = x.shape[1], [0.0] * len(x)
        for t in _progress(reversed(range(1, T)), "EL (generate per prefix)", total=T - 1):
            prompt = x[:, :t]
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_length=T, do_sample=False, num_beams=1,
                eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
            )  # fmt: skip
            for i, (pred, label) in enumerate(zip(out[:, t:].tolist(), x[:, t:].tolist())):
                if eos_token_id in pred:
                    pred = pred[: pred.index(eos_token_id) + 1]
                label_ngrams = [tuple(label[s : s + n]) for s in range(len(label) - n + 1)]
                if label_ngrams:  # else the suffix is shorter than n: skipped
                    label_set = set(label_ngrams)
                    hits = [g for g in (tuple(pred[s : s + n]) for s in range(len(pred) - n + 1)) if g in label_set]
                    total[i] += len(hits) / len(label_ngrams)
        return [v / (T - n) for v in total]

    return _el_by_length(model, input_ids, attention_mask, n, eos_token_id, batch_size, "EL reference", batch_el)


class _BufferLayer(DynamicLayer):
    """A cache layer over preallocated (rows, H, T, D) key and value buffers: ``update`` writes in place (a
    DynamicLayer concatenates, copying its whole cache every step). The batch is the buffer's first rows."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, 0
        self.is_initialized, self.device = True, keys.device

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        rows, end = key_states.shape[0], self.length + key_states.shape[-2]
        self.key_buffer[:rows, :, self.length : end] = key_states
        self.value_buffer[:rows, :, self.length : end] = value_states
        self.keys, self.values = self.key_buffer[:rows, :, :end], self.value_buffer[:rows, :, :end]
        self.length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _decode(
    model: nn.Module, kv: list[tuple[Tensor, Tensor]], rows: Tensor, seq: Tensor, start: list[int], cache_mb: float
) -> None:
    """Fills rows[i, start_i + 1:] in place with the greedy continuation of x[seq_i, :start_i] + rows[i, start_i].

    rows (R, T) sorted by start; kv: per layer the full forward's (keys, values) (B, H, T, D). Time-major: at
    step p the active rows feed rows[:, p] over a cache of p positions; row i joins at p = start_i with the
    cache of x[seq_i, :p]. Rows are decoded in groups whose cache at full length fits ``cache_mb``.
    """
    T = rows.shape[1]
    bytes_per_token = sum(k[0, :, 0].numel() * k.element_size() + v[0, :, 0].numel() * v.element_size() for k, v in kv)
    todo = sum(s < T - 1 for s in start)  # a prefix of T - 1 tokens has its one-token continuation already
    if todo == 0:
        return
    group = min(todo, max(1, int(cache_mb * 2**20 // (bytes_per_token * T))))
    buffers = [(k.new_empty(group, *k.shape[1:]), v.new_empty(group, *v.shape[1:])) for k, v in kv]
    for lo in range(0, todo, group):
        hi = min(lo + group, todo)
        layers = [_BufferLayer(k, v) for k, v in buffers]
        active = lo
        for p in _progress(range(start[lo], T - 1), f"EL decode rows {lo}-{hi} of {todo}"):
            joined = active
            while active < hi and start[active] == p:
                active += 1
            for (k, v), layer in zip(kv, layers):  # joining rows bring their prefix's cache, cut at p
                layer.key_buffer[joined - lo : active - lo, :, :p] = k[seq[joined:active], :, :p]
                layer.value_buffer[joined - lo : active - lo, :, :p] = v[seq[joined:active], :, :p]
                layer.length = p
            out = model(input_ids=rows[lo:active, p : p + 1], use_cache=True, **{_CACHE: Cache(layers=layers)})
            rows[lo:active, p + 1] = out.logits[:, -1].argmax(-1)


def _greedy_continuations(model: nn.Module, x: Tensor, cache_mb: float) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy continuations of every prefix of x (B, T), as (table, owner, row_of):

    table (B + R, T): row b is x[b]; row B + i is x[b_i, :t_i] followed by the greedy continuation of the
    i-th deviating prefix (g_t != x_t), in order of t. owner (B + R,): the sequence of each row.
    row_of (B, T - 1): row_of[b, t - 1] is the table row whose tokens from t on continue x[b, :t] greedily.
    """
    B, T = x.shape
    out = model(input_ids=x, use_cache=True, **{_CACHE: DynamicCache()})  # a full-length cache on every layer
    greedy = out.logits[:, :-1].argmax(-1)  # (B, T-1): greedy[b, t-1] = g_t
    kv = [(layer.keys, layer.values) for layer in getattr(out, _CACHE).layers]  # (B, H, T, D) each
    deviates = greedy != x[:, 1:]  # (B, T-1)
    r, seq = deviates.T.nonzero(as_tuple=True)  # deviating prefixes, sorted by t = r + 1
    rows = x[seq]  # (R, T), a copy
    rows[torch.arange(len(r)), r + 1] = greedy[seq, r]
    _decode(model, kv, rows, seq, (r + 1).tolist(), cache_mb)
    # the continuation of x[b, :t] is that of the first deviating prefix t' >= t, else x[b] itself (column T-1)
    lookup = torch.arange(B, device=x.device)[:, None].repeat(1, T)  # (B, T)
    lookup[seq, r] = B + torch.arange(len(r), device=x.device)
    pos = torch.arange(T - 1, device=x.device).expand(B, T - 1)
    next_dev = torch.where(deviates, pos, T - 1).flip(1).cummin(1).values.flip(1)  # (B, T-1)
    owner = torch.cat([torch.arange(B, device=x.device), seq])
    return torch.cat([x, rows]), owner, lookup.gather(1, next_dev)


def _ngram_ids(tokens: Tensor, owner: Tensor, n: int) -> Tensor:
    """(R, L) tokens of (R,) owners -> (R, L - n + 1) int64 ids, equal iff same owner and same n-gram at that start.

    Exact: ids of windows of width 2^k are the ids of pairs of 2^(k-1) windows (``torch.unique``), and the
    binary digits of n concatenate them. Ids stay below the element count, so a pair key never overflows.
    """

    def pair(a: Tensor, b: Tensor) -> Tensor:
        return torch.unique(a * (b.max() + 1) + b, return_inverse=True)[1]

    L = tokens.shape[1]
    window, span = pair(owner[:, None].expand_as(tokens), tokens), 1  # windows of width span, L - span + 1 starts
    ids, width = None, 0  # ids of windows of width `width` (the low digits of n so far)
    while True:
        if n & span:
            m = L - width - span + 1
            ids = window if ids is None else pair(ids[:, :m], window[:, width : width + m])
            width += span
        if 2 * span > n:
            return ids
        m = L - 2 * span + 1
        window, span = pair(window[:, :m], window[:, span : span + m]), 2 * span


def _overlap_hits(table: Tensor, owner: Tensor, row_of: Tensor, n: int, eos_token_id: int | None) -> Tensor:
    """(B, T - n) int: for t = 1..T-n, the continuation n-grams of x[b, :t] found in the set of suffix n-grams."""
    B, T = row_of.shape[0], table.shape[1]
    ids = _ngram_ids(table, owner, n)  # (B + R, S): n-gram starting at s, S = T - n + 1
    starts = torch.arange(T - n + 1, device=table.device)
    last = torch.full((int(ids.max()) + 1,), -1, device=table.device)  # last start of each n-gram in x (its owner's)
    last.scatter_reduce_(0, ids[:B].flatten(), starts.repeat(B), "amax")
    t = torch.arange(1, T - n + 1, device=table.device)[:, None]  # (T-n, 1): prefix lengths with a suffix n-gram
    rows = row_of[:, : T - n]  # (B, T-n)
    hit = (starts >= t) & (last[ids[rows]] >= t)  # (B, T-n, S): starts in the continuation, in the suffix set
    if eos_token_id is not None:  # the continuation ends at its first EOS at or after t
        pos = torch.arange(T, device=table.device).expand_as(table)
        next_eos = torch.where(table == eos_token_id, pos, T).flip(1).cummin(1).values.flip(1)  # (B + R, T)
        end = next_eos[rows, t.T.expand_as(rows)]  # (B, T-n)
        hit &= starts + n - 1 <= end[..., None]
    return hit.sum(-1)


def extraction_likelihood(
    model: nn.Module,
    input_ids: Tensor,
    n: int = 10,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    cache_mb: float = 1024.0,
) -> Tensor:
    """EL_n of each sequence (N,) float64, equal to ``extraction_likelihood_reference`` (see the module docstring
    for the method and what "equal" means under float rounding). ``attention_mask``: right padding, removed.

    One teacher-forced forward per ``batch_size`` sequences of equal length, then greedy decoding of the prefixes
    where the model deviates from the sequence (none for a sequence it reproduces), at most as many together as
    fit a KV cache of ``cache_mb`` MiB at full length.
    """
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not cache_mb > 0:
        raise ValueError(f"cache_mb must be a number > 0, got {cache_mb!r}")

    def batch_el(x: Tensor) -> list[float]:
        table, owner, row_of = _greedy_continuations(model, x, cache_mb)
        hits = _overlap_hits(table, owner, row_of, n, eos_token_id)
        return [_el_from_overlaps(h, x.shape[1], n) for h in hits.tolist()]

    return _el_by_length(model, input_ids, attention_mask, n, eos_token_id, batch_size, "EL", batch_el)


def _as_sequences(model: nn.Module, sequences) -> list[Tensor]:
    if isinstance(sequences, Tensor):
        ids = _check_token_ids("sequences", sequences, model)
        if ids.dim() != 2:
            raise ValueError(f"sequences must have shape (N, L) or be a list of 1-D sequences, got {tuple(ids.shape)}")
        seqs = list(ids)
    elif isinstance(sequences, Sequence) and not isinstance(sequences, str):
        if len(sequences) == 0:
            raise ValueError("sequences is empty")
        seqs = [_check_token_ids(f"sequences[{i}]", torch.as_tensor(s), model) for i, s in enumerate(sequences)]
    else:
        raise TypeError(f"sequences must be a (N, L) tensor or a list of 1-D sequences, got {type(sequences).__name__}")
    for i, s in enumerate(seqs):
        if s.dim() != 1 or len(s) < 2:
            raise ValueError(f"sequences[{i}] must be 1-D with at least 2 tokens, got shape {tuple(s.shape)}")
    return seqs


def sequence_nll(
    model: nn.Module, sequences, *, context: int | None = None, stride: int | None = None, batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """(summed next-token NLL (N,) float64, number of scored tokens (N,) int64) of each sequence.

    ``sequences``: a (N, L) tensor or a list of 1-D sequences of any lengths. Windows of at most ``context``
    tokens (default: the model's ``max_position_embeddings``) start every ``stride`` tokens (default context // 2)
    and score the tokens after the previous window's end; ``batch_size`` windows per forward, right-padded
    (causal attention: padding after a token never changes its logits).
    """
    seqs = _as_sequences(model, sequences)
    context = context if context is not None else getattr(model.config, "max_position_embeddings", None)
    if context is None:
        raise ValueError("context is None and the model's config has no max_position_embeddings: pass context")
    _check_positive("context", context)
    if context < 2:
        raise ValueError(f"context must be >= 2 (a window predicts its tokens after the first), got {context}")
    stride = context // 2 if stride is None else stride
    _check_positive("stride", stride)
    if stride > context:
        raise ValueError(f"stride must be <= context ({context}), got {stride}")
    _check_positive("batch_size", batch_size)
    windows = []  # (sequence, begin, end, first scored position)
    for i, s in enumerate(seqs):
        prev_end = 0
        for begin in range(0, len(s), stride):
            end = min(begin + context, len(s))
            windows.append((i, begin, end, max(prev_end, begin + 1)))
            prev_end = end
            if end == len(s):
                break
    nll = torch.zeros(len(seqs), dtype=torch.float64)
    count = torch.zeros(len(seqs), dtype=torch.int64)
    with _inference(model) as device:
        for lo in _progress(range(0, len(windows), batch_size), "perplexity"):
            batch = windows[lo : lo + batch_size]
            ids = torch.zeros(len(batch), max(end - begin for _, begin, end, _ in batch), dtype=torch.long)
            scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)  # by target position - 1
            for j, (i, begin, end, first) in enumerate(batch):
                ids[j, : end - begin] = seqs[i][begin:end]
                scored[j, first - begin - 1 : end - begin - 1] = True
            logits = model(input_ids=ids.to(device)).logits[:, :-1].float()  # (W, width - 1, V)
            token_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()
            owner = torch.tensor([w[0] for w in batch])
            nll.index_add_(0, owner, torch.where(scored, token_nll.double(), 0.0).sum(1))
            count.index_add_(0, owner, scored.sum(1))
    return nll, count


def perplexity(
    model: nn.Module, sequences, *, context: int | None = None, stride: int | None = None, batch_size: int = 8
) -> float:
    """exp(total NLL / total scored tokens) over ``sequences`` (token-weighted; see ``sequence_nll``)."""
    nll, count = sequence_nll(model, sequences, context=context, stride=stride, batch_size=batch_size)
    return math.exp(nll.sum().item() / count.sum().item())


def evaluate(
    model: nn.Module,
    sets: dict[str, Tensor],
    *,
    metrics: Sequence[str] = ("ma", "el"),
    n: int = 10,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    cache_mb: float = 1024.0,
) -> dict[str, dict[str, float]]:
    """{set name: {metric: value}} for (N, T) token sets: "ma" and "el" (EL_n) are means over the set's
    sequences, "ppl" the set's token-weighted perplexity. Each metric's function is also callable alone."""
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"sets must be a non-empty dict of name -> (N, T) token ids, got {sets!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if isinstance(metrics, str) or not metrics or unknown:
        raise ValueError(f"metrics must be a non-empty sequence of {METRICS}, got {metrics!r}")
    results = {}
    for name, ids in sets.items():
        row = {}
        if "ma" in metrics:
            row["ma"] = memorization_accuracy(model, ids, batch_size=batch_size).mean().item()
        if "el" in metrics:
            el = extraction_likelihood(
                model, ids, n, eos_token_id=eos_token_id, batch_size=batch_size, cache_mb=cache_mb
            )
            row["el"] = el.mean().item()
        if "ppl" in metrics:
            row["ppl"] = perplexity(model, ids, batch_size=batch_size)
        results[name] = row
    return results
