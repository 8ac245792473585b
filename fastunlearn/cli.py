"""The ``fastunlearn`` command line: ``fastunlearn demo`` and ``fastunlearn info``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, main

    return main(DemoConfig(seed=args.seed))


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _dispatch

    print(f"fastunlearn {__version__}, torch {torch.__version__}")
    print(f"C++ extension (CPU kernels): {'built' if _dispatch.HAS_CSRC else _dispatch._CSRC_MISSING}")
    print(f"Triton (CUDA kernels): {'installed' if _dispatch.HAS_TRITON else 'not installed'}")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.get_device_name() if cuda else 'not available'}")
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        print(f"IHL on {device} tensors runs: {_dispatch.select_impl(torch.device(device))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="Make language models forget data: fused Inverted Hinge Loss and FILA (arXiv 2408.06621).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="offline demo: a tiny model memorizes random sequences, then unlearns them")
    demo.add_argument("--seed", type=int, default=0, help="seed for data and model (default 0)")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="show which kernels (Triton, C++, torch) this install will use")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # user mistakes: a message, not a traceback
        print(f"fastunlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
