"""One dispatch rule for every fast path.

Each fast path is probed once, at import, without initializing CUDA or importing triton:

- ``HAS_TRITON``: the ``triton`` package is installed. It serves CUDA tensors, and CPU tensors only when
  ``TRITON_INTERPRET=1`` was set before the first kernel was defined (that is how CI runs the kernels).
- ``HAS_CSRC``: the compiled extension ``fastunlearn._C`` imports (CPU kernels).

Automatic choice per call: CUDA tensors -> ``triton``; CPU tensors -> ``csrc``; otherwise ``torch``
(the plain-PyTorch implementation every fast path is checked against).
``FASTUNLEARN_IMPL=torch|triton|csrc`` forces one path and raises if it cannot serve the call; tests
use the private ``_force_impl`` context manager for the same purpose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger("fastunlearn")

IMPLS = ("torch", "triton", "csrc")
_override: str | None = None

# Probed once at import. Neither probe imports triton or initializes CUDA; module constants also keep
# select_impl traceable by torch.compile.
HAS_TRITON = importlib.util.find_spec("triton") is not None
try:
    from . import _C  # noqa: F401

    HAS_CSRC, _CSRC_MISSING = True, ""
except ImportError as exc:
    HAS_CSRC, _CSRC_MISSING = False, f"the C++ extension fastunlearn._C is not built ({exc})"
    logger.debug("fastunlearn._C not loaded, CPU ops use the torch path: %s", exc)


def has_triton() -> bool:
    return HAS_TRITON


def has_csrc() -> bool:
    return HAS_CSRC


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
            return _CSRC_MISSING
        if device.type not in csrc_devices:
            return f"this op's C++ kernels serve {'/'.join(csrc_devices)} tensors, not {device.type}"
        return None
    return f"unknown implementation {impl!r}; choose one of {IMPLS}"


def requested_impl() -> str | None:
    """The forced implementation (test override first, then FASTUNLEARN_IMPL), or None for automatic."""
    if _override is not None:
        return _override
    env = os.environ.get("FASTUNLEARN_IMPL", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in IMPLS:
        raise ValueError(f"FASTUNLEARN_IMPL={env!r} is not one of {IMPLS} (or 'auto')")
    return env


def select_impl(
    device: torch.device, available: tuple[str, ...] = IMPLS, csrc_devices: tuple[str, ...] = ("cpu",)
) -> str:
    """Pick the implementation for an op that has ``available`` paths, for tensors on ``device``.

    ``csrc_devices``: the device types the op's C++ kernels accept (ATen-based ops serve CUDA too).
    """
    forced = requested_impl()
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


@contextlib.contextmanager
def _force_impl(impl: str | None) -> Iterator[None]:
    """Test hook: force ``impl`` (or automatic choice with None) inside the block."""
    global _override
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    previous, _override = _override, impl
    try:
        yield
    finally:
        _override = previous
