"""One registry for every op with several implementations, and one rule to choose among them.

Each fast path is probed once, at import, without initializing CUDA or importing triton:

- ``HAS_TRITON``: the ``triton`` package is installed. It serves CUDA tensors, and CPU tensors only when
  ``TRITON_INTERPRET=1`` was set before the first kernel was defined (that is how CI runs the kernels).
- ``HAS_CSRC``: the compiled extension ``fastunlearn._C`` imports (CPU kernels).

**Registry** (``OPS``): per op, its backends (``impl`` -> where the implementation lives, imported on first use)
and what they accept: the device types of its C++ kernels, the dtypes of its Triton kernels.

- ``ihl``: torch, triton, csrc (modules with ``ihl_forward`` / ``ihl_backward``); ``ihl_loss``, ``fused_linear_ihl``.
- ``fisher``: torch, triton (``fisher_accumulate``); ``empirical_fisher``.
- ``weighted_lowrank``: torch; ``weighted_lowrank`` and ``weighted_lowrank_grouped``.
- ``logprob``: torch, triton (modules with ``logprob_forward`` / ``logprob_backward``); ``fused_linear_logprob``.
- ``logprob_argmax``: torch, triton, csrc (``logprob_argmax_forward``, no gradient); ``token_logprob_argmax``,
  ``fused_linear_logprob_argmax`` (evaluation: the NLL and the greedy token of each position in one pass).

**Rule** (:func:`select`): the requested implementation is the caller's ``impl=`` argument, else the tests'
``_force_impl`` override, else ``FASTUNLEARN_IMPL=torch|triton|csrc`` (``auto`` or unset: none). A request the
op cannot honour raises, naming the implementation and why. Otherwise: CUDA tensors -> ``triton``, then
``csrc``; CPU tensors -> ``csrc``; the first one that can run, else ``torch`` (the plain-PyTorch implementation
every fast path is checked against).

To add a backend: put the implementation in its own module with the op's signature, add it to the op's
``backends`` below (and its device / dtype limits), and run the op's tests with ``impl`` parametrized over
``tests/conftest.py``'s ``IMPL_PARAMS``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("fastunlearn")

IMPLS = ("torch", "triton", "csrc")
_override: str | None = None

# Probed once at import. Neither probe imports triton or initializes CUDA; module constants also keep
# select_impl traceable by torch.compile.
HAS_TRITON = importlib.util.find_spec("triton") is not None
try:
    from fastunlearn import _C  # noqa: F401

    HAS_CSRC, CSRC_MISSING = True, ""
except ImportError as exc:
    HAS_CSRC, CSRC_MISSING = False, f"the C++ extension fastunlearn._C is not built ({exc})"
    logger.debug("fastunlearn._C not loaded, CPU ops use the torch path: %s", exc)


def has_triton() -> bool:
    return HAS_TRITON


def has_csrc() -> bool:
    return HAS_CSRC


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Op:
    """An op's backends: impl -> "module" or "module:attribute" (imported on first use), and their limits."""

    backends: dict[str, str]
    csrc_devices: tuple[str, ...] = ("cpu",)  # device types its C++ kernels accept
    triton_dtypes: tuple[torch.dtype, ...] = field(default=(torch.float32, torch.bfloat16, torch.float16))


OPS: dict[str, Op] = {
    "ihl": Op(
        {"torch": "fastunlearn.ops.reference.ihl", "triton": "fastunlearn.kernels.ihl", "csrc": "fastunlearn._C"}
    ),
    "fisher": Op(
        {
            "torch": "fastunlearn.ops.reference.fisher:fisher_accumulate",
            "triton": "fastunlearn.kernels.fisher:fisher_accumulate",
        }
    ),
    "weighted_lowrank": Op({"torch": "fastunlearn.ops.lowrank:weighted_lowrank_torch"}),
    "logprob": Op({"torch": "fastunlearn.ops.reference.logprob", "triton": "fastunlearn.kernels.logprob"}),
    "logprob_argmax": Op(
        {
            "torch": "fastunlearn.ops.reference.logprob:logprob_argmax_forward",
            "triton": "fastunlearn.kernels.logprob:logprob_argmax_forward",
            "csrc": "fastunlearn._C:logprob_argmax_forward",
        }
    ),
}


def _unavailable_reason(impl: str, device: torch.device, csrc_devices: tuple[str, ...] = ("cpu",)) -> str | None:
    """Why ``impl`` cannot serve tensors on ``device``, or None when it can."""
    if impl == "torch":
        return None
    if impl == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs {device.type} tensors only on CUDA, or on CPU with TRITON_INTERPRET=1"
    if impl == "csrc":
        if not HAS_CSRC:
            return CSRC_MISSING
        if device.type not in csrc_devices:
            return f"this op's C++ kernels serve {'/'.join(csrc_devices)} tensors, not {device.type}"
        return None
    return f"unknown implementation {impl!r}; choose one of {IMPLS}"


def _check_impl_name(impl: object, what: str) -> None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"{what} must be one of {IMPLS} or None, got {impl!r}")


def requested_impl(impl: str | None = None) -> str | None:
    """The requested implementation: ``impl`` (a caller's argument), else the test override, else
    FASTUNLEARN_IMPL; None for automatic choice."""
    _check_impl_name(impl, "impl")
    if impl is not None:
        return impl
    if _override is not None:
        return _override
    env = os.environ.get("FASTUNLEARN_IMPL", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in IMPLS:
        raise ValueError(f"FASTUNLEARN_IMPL={env!r} is not one of {IMPLS} (or 'auto')")
    return env


def _choose(device: torch.device, available: tuple[str, ...], csrc_devices: tuple[str, ...], forced: str | None) -> str:
    if forced is not None:
        why = (
            f"this op has no {forced!r} path (it has {available})"
            if forced not in available
            else _unavailable_reason(forced, device, csrc_devices)
        )
        if why is not None:
            raise RuntimeError(f"implementation {forced!r} was requested but cannot run: {why}")
        return forced
    preferred = ("triton", "csrc") if device.type == "cuda" else ("csrc",)
    for impl in preferred:
        if impl in available and _unavailable_reason(impl, device, csrc_devices) is None:
            return impl
    return "torch"


def select(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = (), impl: str | None = None) -> str:
    """The implementation of registered ``op`` for tensors on ``device`` of ``dtypes`` (see the module rule).

    ``impl``: the caller's explicit choice (None: automatic, or the test override / FASTUNLEARN_IMPL).
    """
    spec = OPS[op]
    available = tuple(
        name
        for name in spec.backends
        if name != "triton" or all(dtype in spec.triton_dtypes for dtype in dtypes)  # e.g. float64 -> torch
    )
    return _choose(device, available, spec.csrc_devices, requested_impl(impl))


def implementation(op: str, impl: str):
    """The backend ``impl`` of registered ``op``: a module, or the function its entry names."""
    module, _, attribute = OPS[op].backends[impl].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def select_impl(
    device: torch.device, available: tuple[str, ...] = IMPLS, csrc_devices: tuple[str, ...] = ("cpu",)
) -> str:
    """The rule for an op with ``available`` paths on ``device`` (no explicit request); ``csrc_devices``: the
    device types the op's C++ kernels accept. ``select_impl(device)`` is what ``ihl_loss`` gets there."""
    return _choose(device, available, csrc_devices, requested_impl())


@contextlib.contextmanager
def _force_impl(impl: str | None) -> Iterator[None]:
    """Test hook: force ``impl`` (or automatic choice with None) inside the block."""
    global _override
    _check_impl_name(impl, "impl")
    previous, _override = _override, impl
    try:
        yield
    finally:
        _override = previous
