"""``fastunlearn info``: which kernels (Triton, C++, torch) and torchrun backends this install will use."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show which kernels (Triton, C++, torch) this install will use")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the versions and which kernels (Triton, C++, torch) this install will use."""
    import torch

    from fastunlearn import __version__
    from fastunlearn.ops import dispatch

    print(f"fastunlearn {__version__}, torch {torch.__version__}")
    print("versions: " + ", ".join(f"{name} {_version(name)}" for name in VERSIONS))
    print(f"C++ extension (CPU kernels): {'built' if dispatch.HAS_CSRC else dispatch.CSRC_MISSING}")
    print(f"Triton (CUDA kernels): {'installed' if dispatch.HAS_TRITON else 'not installed'}")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.get_device_name() if cuda else 'not available'}")
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        print(f"IHL on {device} tensors runs: {dispatch.select_impl(torch.device(device))}")
    print(f"torchrun backends (torch.distributed): {_backends()}; GPUs: {torch.cuda.device_count()}")
    return 0


VERSIONS = ("torch", "transformers", "triton", "peft", "datasets")  # the releases a bug report needs


def _version(distribution: str) -> str:
    """The installed release of ``distribution``, read from its metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _backends() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "none (this torch build has no torch.distributed)"
    found = [name for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available())) if ok]
    return ", ".join(found) or "none"
