"""Faults injected into a child process: the command line run under a file size limit (``RLIMIT_FSIZE``), so
that a write past ``limit`` bytes fails as on a full disk (EFBIG; SIGXFSZ is ignored, so the write fails instead
of killing the process), whichever library writes (os.write, safetensors' Rust writer, json, matplotlib)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import ROOT

# Everything the command imports is imported before the limit is set (a cache written at import time, e.g.
# matplotlib's font list, is not what the test is about); one thread, as the in-process runs it is compared with.
CHILD = """
import resource, signal, sys
import torch
torch.set_num_threads(1)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import transformers
import fastunlearn.engine, fastunlearn.engine.finetune
from fastunlearn.cli import main
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[2:]))
"""


def run_with_file_limit(argv: list[str], limit: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """``fastunlearn ARGV`` in a child process whose files cannot grow past ``limit`` bytes; the environment is
    the test's (TRITON_INTERPRET, FASTUNLEARN_CACHE_DIR)."""
    command = [sys.executable, "-c", CHILD, str(limit), *[str(a) for a in argv]]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines (timestamped) and bars: the error lines a user reads."""
    return [line for line in stderr.splitlines()
            if line.strip() and "%|" not in line and not line[:2].isdigit() and "Warning" not in line]  # fmt: skip
