"""Progress of a run's long phases as log lines of the ``fastunlearn.engine`` logger (rank 0 only), so a run
whose output is not a terminal (no tqdm bars) never sits silent: "baseline: held-out EL_10 3/8 batches, 12 s
elapsed, ETA 20 s". :func:`log_to_terminal` shows those lines (level INFO) on stderr, between tqdm's bars.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

from fastunlearn.utils import distributed as dist_utils

logger = logging.getLogger("fastunlearn.engine")

EVERY_S = 10.0  # a phase logs at most one line per this many seconds, and a closing one if it lasted longer
clock = time.monotonic  # seconds (a test replaces it)


def info(*args) -> None:
    """``logger.info`` on rank 0 only."""
    if dist_utils.current().is_main:
        logger.info(*args)


class Progress:
    """Batches done of ``total`` in one phase ("baseline: held-out EL_10"): ``step()`` after each batch logs
    "<phase> i/total batches, E s elapsed, ETA R s" when ``EVERY_S`` seconds passed since the phase began or
    its last line, and at the end of a phase that lasted ``EVERY_S`` or more. R = E / i x (total - i)."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.start = self.last = clock()

    def step(self) -> None:
        self.done += 1
        now = clock()
        elapsed = now - self.start
        finished = self.done >= self.total
        if now - self.last >= EVERY_S or (finished and elapsed >= EVERY_S):
            self.last = now
            eta = elapsed / self.done * (self.total - self.done)
            info("%s %d/%d batches, %.0f s elapsed, ETA %.0f s", self.phase, self.done, self.total, elapsed, eta)


class _TqdmHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` through ``tqdm.write``, which clears the bars, prints and redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def log_to_terminal() -> None:
    """Show the ``fastunlearn`` loggers' INFO lines on stderr with the time ("15:02:11 baseline: ..."); for
    the command line (a library leaves logging to its caller). Idempotent: one handler however often called."""
    package = logging.getLogger("fastunlearn")
    if not any(isinstance(h, _TqdmHandler) for h in package.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        package.addHandler(handler)
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
