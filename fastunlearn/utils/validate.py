"""Input checks shared by the whole package. Each error names the argument and the bad value.

Argument checks: ``is_int`` / ``is_number`` (predicates) and ``check_int``, ``check_number``, ``check_fraction``,
``check_bool``, ``check_choice`` (raise). A wrong type raises :class:`ArgumentTypeError`, both a TypeError and a
ValueError; a wrong value raises ValueError.

Token ids against a model: ``check_token_ids`` (every id one the model's input embeddings can look up) and
``check_positions`` (no sequence longer than the positions its config declares).

Tensor checks for the losses:

Metadata checks (shape, dtype, device) are free and always run. Value checks (labels in range,
finite logits) need a host synchronization, so they run by default on CPU tensors only; on CUDA the
kernels mark such rows with a NaN loss instead, which no reduction hides. ``FASTUNLEARN_CHECK_VALUES=1``
turns value checks on everywhere (``0``: off everywhere); they never run under torch.compile or while
a CUDA graph is being captured.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def is_int(value: object, low: int | None = None) -> bool:
    """An int (not a bool), at least ``low`` if given."""
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ValueError, so callers that report bad input (the CLI catches
    ValueError) treat a wrong type like a wrong value."""


def check_int(name: str, value: object, low: int | None = None) -> None:
    """``value`` is an int (not a bool), at least ``low`` if given; else an error naming ``name`` and the value."""
    wanted = "an int" if low is None else f"an int >= {low}"
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {wanted}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def check_number(name: str, value: object, low: float | None = None, *, strict: bool = False) -> None:
    """``value`` is a finite int or float (not a bool), >= ``low`` (> with ``strict``) if given."""
    bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a finite number{bound}, got {value!r}")
    if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_fraction(name: str, value: object, *, include_one: bool = False) -> None:
    """``value`` is a number in [0, 1) (or [0, 1] with ``include_one``)."""
    interval = "[0, 1]" if include_one else "[0, 1)"
    if not is_number(value) or not (0 <= value <= 1 if include_one else 0 <= value < 1):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def token_id_limit(model: object) -> tuple[int, str] | None:
    """(how many token ids ``model`` can look up, what says so): the rows of its input embeddings, else its config's
    ``vocab_size``; None when it has neither."""
    try:
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):
        rows = None
    if is_int(rows):
        return rows, f"the model's input embeddings have {rows} rows (its vocabulary)"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return (vocab, f"the model's vocabulary (config.vocab_size) has {vocab} ids") if is_int(vocab) else None


def check_token_ids(name: str, ids: object, model: object) -> torch.Tensor:
    """``ids``: a non-empty integer tensor of token ids, each in [0, N) for the N ids ``model`` can look up
    (:func:`token_id_limit`; not checked when the model says neither), else an error naming ``name``: TypeError
    for a wrong type, ValueError for an empty tensor or an id out of range (a tokenizer that does not match the
    model), instead of an IndexError deep in the forward. Returns the ids as int64 on the CPU."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)})")
    limit = token_id_limit(model)
    low, high = int(ids.min()), int(ids.max())
    if limit is not None and (low < 0 or high >= limit[0]):
        rows, source = limit
        raise ValueError(
            f"{name} has token id {low if low < 0 else high}, outside [0, {rows}) (min {low}, max {high}): {source}; "
            "were the ids made by this model's tokenizer?"
        )
    return ids.long().cpu()


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # where a config gives its positions


def max_positions(model: object) -> int | None:
    """The number of positions ``model``'s config declares (``POSITION_KEYS``, the first that is set), or None."""
    config = getattr(model, "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if is_int(value) and value > 0:
            return value
    return None


def check_positions(name: str, length: int, model: object) -> None:
    """ValueError naming ``name`` when ``length`` tokens are more than the positions ``model`` declares (its
    position embeddings would be indexed out of range, or a rotary model run past its trained context)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"{name} is {length} tokens, longer than the model's {limit} positions "
                         f"(config.{next(k for k in POSITION_KEYS if getattr(model.config, k, None) == limit)}): "
                         f"use {limit} tokens or fewer")  # fmt: skip


def check_float_tensor(name: str, t: object, min_dim: int = 1, *, float64: bool = False) -> None:
    """``float64``: accept float64 too (the plain-PyTorch cross-entropy: float64 checks of the LM loss)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and not (float64 and t.dtype == torch.float64):
        raise TypeError(f"{name} must be float32, bfloat16{', float16 or float64' if float64 else ' or float16'}, "
                        f"got {t.dtype}")  # fmt: skip
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_labels(labels: object, expected_shape: torch.Size, device: torch.device, what: str) -> None:
    """labels: an integer tensor of ``expected_shape`` on ``device`` (``what`` names the other argument)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {what} needs {tuple(expected_shape)} "
            f"(labels must already be aligned with the logits; see shift_causal for causal LMs)"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {what.split()[0]} is on {device}")
    if labels.numel() == 0:
        raise ValueError(f"labels is empty (shape {tuple(labels.shape)}): there are no tokens to score")


def check_reduction_and_margin(reduction: str, margin: float) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    check_number("margin", margin, 0, strict=True)


def value_checks_enabled(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    env = os.environ.get("FASTUNLEARN_CHECK_VALUES", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cpu"


def check_label_values(labels: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, n_classes) (synchronizes)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels contains {first}, outside [0, {n_classes}) and not ignore_index={ignore_index} "
            f"({int(bad.sum())} such labels)"
        )


def check_finite_rows(loss_rows: torch.Tensor, name: str) -> None:
    """A NaN row loss marks a row whose logits are NaN, +inf or all -inf (synchronizes)."""
    bad = torch.isnan(loss_rows)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} has non-finite values in row {first} of the flattened (N, V) view "
            f"(NaN, +inf, or every entry -inf; {int(bad.sum())} such rows among non-ignored tokens)"
        )
