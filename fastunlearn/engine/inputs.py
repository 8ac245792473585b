"""The data and model an unlearning run is given: which sets it has, checks that would otherwise surface as a
wrong result or a late error (a held-out set that repeats the forget set, NaN weights, token ids the model has
no embedding for), and fingerprints that a resume must match."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn

from fastunlearn.data.labels import count_targets
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.utils.validate import check_positions, check_token_ids


def set_name(task: int, n_tasks: int) -> str:
    return "forget set" if n_tasks == 1 else f"forget set {task + 1} of {n_tasks}"


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    """Next-token targets of a batch (``objectives.next_token_targets``: only labelled ones when the batch has
    ``labels``), counted where the batch lives."""
    return int(count_targets(batch["input_ids"], batch["attention_mask"], batch.get("labels")))


def check_data(data, cfg: UnlearnConfig) -> tuple[list[SequenceSet], SequenceSet | None, SequenceSet | None]:
    """(forget sets, retain set, held-out set); ValueError / TypeError naming the set and what it lacks."""
    if isinstance(data, UnlearningData):
        forget, retain, heldout = data.forget, data.retain, data.heldout
        tasks = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    elif isinstance(data, (list, tuple)):
        tasks, retain, heldout = list(data), None, None
    else:
        raise TypeError(f"data must be an UnlearningData or a list of forget SequenceSets, got {type(data).__name__}")
    if not tasks:
        raise ValueError("data has no forget set: nothing to unlearn")
    sets = [(set_name(i, len(tasks)), seqs, True) for i, seqs in enumerate(tasks)]
    sets += [("retain set", retain, False), ("held-out set", heldout, True)]
    for name, seqs, scored in sets:  # scored: MA and EL are measured on it
        if seqs is not None:
            check_set(name, seqs, cfg.el_n if scored and cfg.stop != "epochs" else None)  # "epochs": no EL
    if retain is None:
        for needs, why in (
            (cfg.retain_weight > 0, f"retain_weight={cfg.retain_weight} (set retain_weight=0 for no retain loss)"),
            (cfg.params == "fila", "params='fila' (FILA weighs forget against retain Fisher information)"),
            (cfg.eval_retain_ppl, "eval_retain_ppl=True"),
        ):
            if needs:
                raise ValueError(f"{why} needs a retain set, and data has none")
    if cfg.stop == "heldout" and heldout is None:
        raise ValueError("stop='heldout' needs a held-out set, and data has none (or use stop='threshold' or 'epochs')")
    if heldout is not None and not cfg.allow_heldout_overlap:
        check_heldout_overlap(tasks, heldout)
    return tasks, retain, heldout


def check_set(name: str, seqs, el_n: int | None) -> None:
    """TypeError / ValueError naming the set: not a SequenceSet, no next-token target, or (``el_n`` given) a
    sequence too short for EL_n."""
    if not isinstance(seqs, SequenceSet):
        raise TypeError(f"{name} must be a SequenceSet, got {type(seqs).__name__}")
    if len(seqs) == 0 or n_targets(batch(seqs)) == 0:
        raise ValueError(f"{name} is empty: it has {len(seqs)} sequences and no next-token target")
    if el_n is not None:
        seqs.check_el_length(name, el_n)


def utility_sets(data) -> dict[str, SequenceSet]:
    """``data.utility`` checked ({} when there is none): {name: SequenceSet}, text never trained on whose
    perplexity the run measures; TypeError / ValueError naming the set."""
    utility = getattr(data, "utility", None) or {}
    if not isinstance(utility, dict):
        raise TypeError(f"data.utility must be a dict {{name: SequenceSet}}, got {type(utility).__name__}")
    for name, seqs in utility.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"utility set names must be non-empty strings, got {name!r}")
        check_set(f"utility set {name}", seqs, None)
    return dict(utility)


# A held-out row "overlaps" the forget set(s) when it is identical to a forget row (its unpadded tokens), or
# near-identical: at least OVERLAP_FRACTION of its OVERLAP_N-token n-grams occur in forget rows (one changed
# token removes at most 8 of a row's n-grams, so a 200-token row with 2 changed tokens still counts). Such a row
# is text the model memorized, so the held-out level that the criterion copies would be a memorized level and
# the run would "succeed" at once. Shared boilerplate stays below: between the paper's disjoint TDEC samples
# (MIT license headers) the highest fraction is 0.80 (word-level tokens). In a set with labels (question/answer
# pairs) only windows of labelled tokens count, since MA and EL score the answers: a held-out answer repeating a
# forget answer overlaps whatever its question, while a shared prompt template does not.
OVERLAP_N = 8
OVERLAP_FRACTION = 0.9
HASH_PRIME, HASH_BASES = 2**31 - 1, (1_000_003, 998_244_353)


def _row_keys(seqs: SequenceSet) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]


def _ngram_hashes(seqs: SequenceSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(hashes (N, W) int64, valid (N, W) bool) of every OVERLAP_N-token window, W = L - OVERLAP_N + 1; a window
    is valid when it holds no padding. Two polynomial hashes mod the prime 2^31 - 1 side by side in one int64
    (no product overflows): the same n-gram always gets the same hash, two different ones collide with
    probability ~2^-62, which could only over-report an overlap. With ``labels``, a window is valid when all its
    tokens are labelled."""
    ids, mask = seqs.input_ids, seqs.attention_mask
    if seqs.labels is not None:
        mask = mask.bool() & (seqs.labels != -100)
    if ids.shape[1] < OVERLAP_N:
        empty = torch.zeros(len(ids), 0, dtype=torch.int64)
        return empty, empty.bool()
    windows = ids.unfold(1, OVERLAP_N, 1) % HASH_PRIME  # (N, W, n)
    hashes = torch.zeros(windows.shape[:2], dtype=torch.int64)
    for base in HASH_BASES:
        powers = torch.tensor([pow(base, k, HASH_PRIME) for k in range(OVERLAP_N)], dtype=torch.int64)
        hashes = hashes * HASH_PRIME + ((windows * powers) % HASH_PRIME).sum(-1) % HASH_PRIME  # products < 2^62
    return hashes, mask.unfold(1, OVERLAP_N, 1).bool().all(-1)


def check_heldout_overlap(tasks: list[SequenceSet], heldout: SequenceSet) -> None:
    """ValueError naming the forget set(s) and counting the held-out rows that overlap them (rule above)."""
    held_keys, (held_hash, held_valid) = _row_keys(heldout), _ngram_hashes(heldout)
    overlaps = torch.zeros(len(heldout), dtype=torch.bool)
    identical = torch.zeros(len(heldout), dtype=torch.bool)
    example, sets = None, []
    for k, forget in enumerate(tasks):
        rows = {key: i for i, key in reversed(list(enumerate(_row_keys(forget))))}  # first row with these tokens
        same = torch.tensor([key in rows for key in held_keys])
        f_hash, f_valid = _ngram_hashes(forget)
        shared = torch.isin(held_hash, f_hash[f_valid]) & held_valid  # (N_heldout, W)
        counts = held_valid.sum(1)
        near = (counts > 0) & (shared.sum(1) >= OVERLAP_FRACTION * counts)
        hit = same | near
        if hit.any():
            sets.append(set_name(k, len(tasks)))
            if example is None:
                h = int(hit.nonzero()[0])
                row = rows.get(held_keys[h])
                if row is None:  # the forget row sharing the most of held-out row h's n-grams
                    hits = torch.isin(f_hash, held_hash[h][held_valid[h]]) & f_valid
                    row = int(hits.sum(1).argmax())
                example = f"held-out row {h} ~ {set_name(k, len(tasks))} row {row}"
        overlaps |= hit
        identical |= same
    if sets:
        n, n_same = int(overlaps.sum()), int(identical.sum())
        raise ValueError(
            f"the held-out set overlaps the {' and the '.join(sets)}: {n} of {len(heldout)} held-out rows are in it "
            f"({n_same} identical, {n - n_same} sharing >= {OVERLAP_FRACTION:.0%} of their {OVERLAP_N}-token "
            f"n-grams; e.g. {example}), so the held-out level is a memorized one and the criterion would be met at "
            "once; use held-out text the model never saw, or allow_heldout_overlap=True (--allow-heldout-overlap)"
        )


def check_model(model: nn.Module, tasks: list[SequenceSet], retain: SequenceSet | None,
                heldout: SequenceSet | None, utility: dict[str, SequenceSet] | None = None) -> None:  # fmt: skip
    """Before any compute: ValueError naming the first parameter with a NaN / inf value (a host sync per
    parameter, once per run), the first set with a token id (or label other than -100) outside the model's
    input embedding rows, or with rows longer than the model's positions."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.detach()).all()):
            n_nan, n_inf = int(torch.isnan(param).sum()), int(torch.isinf(param).sum())
            raise ValueError(
                f"model parameter {name!r} has {n_nan} NaN and {n_inf} inf values (of {param.numel()}): the model "
                "is broken before unlearning; load a model with finite weights"
            )
    sets = [(set_name(k, len(tasks)), t) for k, t in enumerate(tasks)]
    sets += [(f"utility set {name}", seqs) for name, seqs in (utility or {}).items()]
    for name, seqs in [*sets, ("retain set", retain), ("held-out set", heldout)]:
        if seqs is not None:
            check_positions(f"{name}'s rows (seq_len)", seqs.input_ids.shape[-1], model)
            if seqs.input_ids.numel():
                check_token_ids(name, seqs.input_ids, model)
            scored = None if seqs.labels is None else seqs.labels[seqs.labels != -100]  # -100: not scored
            if scored is not None and scored.numel():
                check_token_ids(f"{name} labels", scored, model)


def batch(seqs: SequenceSet) -> dict[str, torch.Tensor]:
    """The whole set as one batch: ``SequenceSet.batch`` (``labels`` included when the set has them)."""
    return seqs.batch()


def fingerprint(sets: Sequence[SequenceSet | None]) -> str:
    """sha256 of each set's ids and mask, then, for a set with ``labels``, a tag and the labels (a set without
    labels hashes as it always did, so earlier checkpoints and caches still match)."""
    digest = hashlib.sha256()
    for seqs in sets:
        tensors = (None,) if seqs is None else (seqs.input_ids, seqs.attention_mask)
        if seqs is not None and seqs.labels is not None:
            tensors += (b"labels", seqs.labels)
        for t in tensors:
            if isinstance(t, bytes):
                digest.update(t)
                continue
            digest.update(b"none" if t is None else repr(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(tasks: list[SequenceSet], retain: SequenceSet | None, heldout: SequenceSet | None,
                     utility: dict[str, SequenceSet] | None = None) -> str:  # fmt: skip
    """sha256 of a run's sets, which a resume must match: ``fingerprint`` of the forget, retain and held-out
    sets, then each utility set's name and fingerprint (none: the three sets' fingerprint alone)."""
    digest = fingerprint([*tasks, retain, heldout])
    if not utility:
        return digest
    combined = hashlib.sha256(digest.encode())
    for name in sorted(utility):
        combined.update(b"\0utility\0" + name.encode() + b"\0" + fingerprint([utility[name]]).encode())
    return combined.hexdigest()


FINGERPRINT_FULL_BYTES = 256 * 2**20  # models up to this size hash every weight; larger ones a fixed sample
FINGERPRINT_SAMPLE = 4096  # elements hashed per tensor of a larger model (evenly spaced, deterministic)


# Config keys that name where a model was loaded from or which library wrote it, not what it is: left out of the
# fingerprint, so a copy of a model, or the same model by another path, is the same model.
NOT_ARCHITECTURE = ("_name_or_path", "_commit_hash", "transformers_version")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture (class and config) and its weights as given (before any adapter), so a
    resume or a cached baseline can tell another model from this one, and not a copy or another path of it.

    The config's fields but ``NOT_ARCHITECTURE`` (and private ``_*`` keys) are hashed, then every parameter and
    buffer name, shape and dtype; their values in full up to ``FINGERPRINT_FULL_BYTES`` of weights, else
    ``FINGERPRINT_SAMPLE`` evenly spaced elements of each tensor (a deterministic sample: a changed fine-tune shows
    in it; one flipped weight may not).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in NOT_ARCHITECTURE and not k.startswith("_")}
        digest.update(json.dumps(fields, sort_keys=True, default=repr).encode())
    digest.update(type(model).__name__.encode())
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    full = sum(t.numel() * t.element_size() for t in tensors.values()) <= FINGERPRINT_FULL_BYTES
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        if not full and flat.numel() > FINGERPRINT_SAMPLE:
            step = flat.numel() // FINGERPRINT_SAMPLE
            flat = flat[:: max(step, 1)][:FINGERPRINT_SAMPLE]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
