"""EL_n, extraction likelihood (see ``fastunlearn.evals.metrics`` for the definition): the reference (one ``generate``
call per prefix length) and the fast path.

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

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastunlearn.evals.metrics.common import check_batch, inference, progress
from fastunlearn.utils.optional import missing
from fastunlearn.utils.validate import check_int, check_number, is_int

try:
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:
    raise missing("transformers", "engine", "fastunlearn.evals.metrics") from exc

# transformers 5.x renamed past_key_values (forward argument and output field) to cache
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _el_by_length(model: nn.Module, input_ids, attention_mask, n: int, eos_token_id, batch_size: int, desc: str,
                  batch_el: Callable[[Tensor, list[int]], list[float]], answer_start=None) -> Tensor:  # fmt: skip
    """Checks the EL arguments, then fills EL (N,) float64 with ``batch_el(x, starts)`` of ``batch_size``
    sequences of equal length at a time, on the model's device: padding (right side only) is removed and
    sequences grouped by length. ``starts``: each row's first scored prefix length (1, or its answer start)."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1)
    if eos_token_id is not None and not is_int(eos_token_id):
        raise TypeError(f"eos_token_id must be an int token id or None, got {eos_token_id!r}")
    ids = check_batch(model, input_ids, 2)
    lengths = torch.full((len(ids),), ids.shape[1])
    if attention_mask is not None:
        mask = attention_mask.cpu().bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(ids.shape[1]) < lengths[:, None]):
            raise ValueError("attention_mask must be right padding (each row ones, then zeros) for EL")
    starts = torch.ones(len(ids), dtype=torch.int64)
    if answer_start is not None:
        answer_start = torch.as_tensor(answer_start).cpu()
        if answer_start.shape != (len(ids),) or answer_start.dtype.is_floating_point:
            raise ValueError(f"answer_start must be (N,) = ({len(ids)},) integer positions, got "
                             f"{answer_start.dtype} of shape {tuple(answer_start.shape)}")  # fmt: skip
        starts = answer_start.long().clamp(min=1)  # the first token is never predicted
        short = (lengths - starts < n).nonzero().flatten()
        if len(short):
            i = int(short[0])
            raise ValueError(
                f"EL_n with n={n} needs answers of at least n = {n} tokens (a suffix of n tokens after the prompt), "
                f"sequence {i} has {max(int(lengths[i] - starts[i]), 0)} from its answer start {int(answer_start[i])}"
            )
    short = (lengths <= n).nonzero().flatten()
    if len(short):
        raise ValueError(
            f"EL_n with n={n} needs sequences of at least n + 1 = {n + 1} tokens (a suffix of n tokens after a "
            f"prefix of one), sequence {int(short[0])} has {int(lengths[short[0]])}"
        )
    el = torch.empty(len(ids), dtype=torch.float64)
    with inference(model) as device:
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().flatten()
            for chunk in progress(rows.split(batch_size), desc, total=-(-len(rows) // batch_size)):
                values = batch_el(ids[chunk, :length].to(device), starts[chunk].tolist())
                el[chunk] = torch.tensor(values, dtype=torch.float64)
    return el


def _el_from_overlaps(hits: list[int], T: int, n: int, start: int = 1) -> float:
    """EL_n of one sequence from hits[t - 1] (t = start..T-n), summed from the longest prefix down like Jang
    et al.; ``start`` > 1: only prefixes of at least ``start`` tokens (the prompt plus answer[:t - start])."""
    total = 0.0
    for t in reversed(range(start, T - n + 1)):
        total += hits[t - 1] / (T - t - n + 1)  # suffix x_>=t has T - t - n + 1 n-grams
    return total / (T - n - start + 1)


def extraction_likelihood_reference(
    model: nn.Module,
    input_ids: Tensor,
    n: int = 10,
    *,
    attention_mask: Tensor | None = None,
    answer_start: Tensor | None = None,
    eos_token_id: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """EL_n of each sequence (N,) float64 the straightforward way (Jang et al.): for each prefix length, one
    greedy ``model.generate`` call (KV cache) over ``batch_size`` sequences, n-grams as python tuples.
    T - 1 generate calls per batch. See the module docstring for the definition and the EOS convention;
    ``answer_start`` as in :func:`extraction_likelihood`."""

    def batch_el(x: Tensor, starts: list[int]) -> list[float]:
        T, total = x.shape[1], [0.0] * len(x)
        first = min(starts)
        for t in progress(reversed(range(first, T)), "EL (generate per prefix)", total=T - first):
            prompt = x[:, :t]
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_length=T, do_sample=False, num_beams=1,
                eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id,
            )  # fmt: skip
            for i, (pred, label) in enumerate(zip(out[:, t:].tolist(), x[:, t:].tolist())):
                if t < starts[i]:  # a prefix inside the prompt: not scored
                    continue
                if eos_token_id in pred:
                    pred = pred[: pred.index(eos_token_id) + 1]
                label_ngrams = [tuple(label[s : s + n]) for s in range(len(label) - n + 1)]
                if label_ngrams:  # else the suffix is shorter than n: skipped
                    label_set = set(label_ngrams)
                    hits = [g for g in (tuple(pred[s : s + n]) for s in range(len(pred) - n + 1)) if g in label_set]
                    total[i] += len(hits) / len(label_ngrams)
        return [v / (T - n - s + 1) for v, s in zip(total, starts)]

    return _el_by_length(model, input_ids, attention_mask, n, eos_token_id, batch_size, "EL reference", batch_el,
                         answer_start)  # fmt: skip


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
        for p in progress(range(start[lo], T - 1), f"EL decode rows {lo}-{hi} of {todo}"):
            joined = active
            while active < hi and start[active] == p:
                active += 1
            for (k, v), layer in zip(kv, layers):  # joining rows bring their prefix's cache, cut at p
                layer.key_buffer[joined - lo : active - lo, :, :p] = k[seq[joined:active], :, :p]
                layer.value_buffer[joined - lo : active - lo, :, :p] = v[seq[joined:active], :, :p]
                layer.length = p
            out = model(input_ids=rows[lo:active, p : p + 1], use_cache=True, **{_CACHE: Cache(layers=layers)})
            rows[lo:active, p + 1] = out.logits[:, -1].argmax(-1)


def _greedy_continuations(
    model: nn.Module, x: Tensor, cache_mb: float, starts: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy continuations of every prefix of x (B, T) of at least ``starts[b]`` tokens (None: all), as
    (table, owner, row_of):

    table (B + R, T): row b is x[b]; row B + i is x[b_i, :t_i] followed by the greedy continuation of the
    i-th deviating prefix (g_t != x_t, t >= starts[b_i]), in order of t. owner (B + R,): the sequence of each row.
    row_of (B, T - 1): row_of[b, t - 1] is the table row whose tokens from t on continue x[b, :t] greedily
    (for t >= starts[b]; shorter prefixes, e.g. inside a question's prompt, are neither decoded nor valid).
    """
    B, T = x.shape
    out = model(input_ids=x, use_cache=True, **{_CACHE: DynamicCache()})  # a full-length cache on every layer
    greedy = out.logits[:, :-1].argmax(-1)  # (B, T-1): greedy[b, t-1] = g_t
    kv = [(layer.keys, layer.values) for layer in getattr(out, _CACHE).layers]  # (B, H, T, D) each
    deviates = greedy != x[:, 1:]  # (B, T-1)
    if starts is not None and max(starts) > 1:  # prefixes shorter than the start are not scored: not decoded
        first = torch.tensor(starts, device=x.device)[:, None]  # (B, 1)
        deviates &= torch.arange(1, T, device=x.device) >= first
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
    answer_start: Tensor | None = None,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    cache_mb: float = 1024.0,
) -> Tensor:
    """EL_n of each sequence (N,) float64, equal to ``extraction_likelihood_reference`` (see the module docstring
    for the method and what "equal" means under float rounding). ``attention_mask``: right padding, removed.

    ``answer_start`` (N,) int or None: where each row's answer starts (``objectives.answer_start`` of a
    question/answer set's labels, ``fastunlearn.data.qa``). Only the prefixes prompt + answer[:k] (lengths
    t = a..T-n, a = max(answer_start, 1)) are scored, each continuation against the rest of the answer, and
    EL_n = sum_t overlap_t / (T - n - a + 1); a = 1 is plain EL_n. Each answer needs at least n tokens.

    One teacher-forced forward per ``batch_size`` sequences of equal length, then greedy decoding of the prefixes
    where the model deviates from the sequence (none for a sequence it reproduces), at most as many together as
    fit a KV cache of ``cache_mb`` MiB at full length.
    """
    check_number("cache_mb", cache_mb, 0, strict=True)

    def batch_el(x: Tensor, starts: list[int]) -> list[float]:
        table, owner, row_of = _greedy_continuations(model, x, cache_mb, starts)
        hits = _overlap_hits(table, owner, row_of, n, eos_token_id)
        return [_el_from_overlaps(h, x.shape[1], n, s) for h, s in zip(hits.tolist(), starts)]

    return _el_by_length(model, input_ids, attention_mask, n, eos_token_id, batch_size, "EL", batch_el, answer_start)
