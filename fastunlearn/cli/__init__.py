"""The ``fastunlearn`` command line (entry point :func:`main`): one module per subcommand."""

from fastunlearn.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
