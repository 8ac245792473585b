"""The output directory of a run, ``OUT``: the outputs at its top, everything else in the run's own folder
``OUT/.fastunlearn/`` (``PRIVATE``):

- ``run.json``: the marker that makes OUT a run directory (written when a run claims a missing or empty OUT);
- ``lock``: locked (``fcntl.flock``, exclusive) by the run using OUT for as long as it runs; holds its pid;
- ``checkpoint.json`` and ``checkpoint-NNNNNN/``: the checkpoint (``engine.checkpoint``);
- ``tmp/``: the temporaries of every atomic write in OUT (``fastunlearn.utils.atomic``), cleared when a run starts.

A finished run removes PRIVATE (the checkpoint first, the lock file last, still locked: a run that locked
the removed file meanwhile finds the outputs and refuses OUT). A run deletes only inside PRIVATE. It refuses,
before touching anything, an OUT that is a file, or neither missing, empty nor a run directory; an OUT it
cannot write, before any compute; and an OUT another run holds, at once. Only rank 0 of a multi-process run
claims OUT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from fastunlearn.utils.atomic import PRIVATE, SCRATCH, atomic_write

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

MARKER = "run.json"
LOCK = "lock"

logger = logging.getLogger("fastunlearn.engine")


class OutDirError(FileExistsError, ValueError):
    """out_dir cannot be used as asked; the message (one line) names it, says why and what to do. Both a
    FileExistsError and a ValueError: a user's mistake, not a failure of the run."""


def is_run_dir(out: Path) -> bool:
    """OUT holds a run's marker, or nothing but PRIVATE (a run killed before it wrote its marker)."""
    return (out / PRIVATE / MARKER).is_file() or [p.name for p in out.iterdir()] == [PRIVATE]


def check_usable(out: Path) -> None:
    """Refuse an OUT that is a file, holds someone else's files, or cannot be written; touches nothing."""
    name = repr(str(out))
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out_dir {name} exists and is not a directory")
    if not out.exists():
        return
    if any(out.iterdir()) and not is_run_dir(out):
        raise not_fresh(out)
    if not os.access(out, os.W_OK | os.X_OK) or (
        (out / PRIVATE).is_dir() and not os.access(out / PRIVATE, os.W_OK | os.X_OK)
    ):
        raise OutDirError(f"out_dir {name} is not writable")


class OutDirLock:
    """An exclusive ``flock`` on ``OUT/.fastunlearn/lock`` (released by :meth:`release`, or when the process
    ends, however it ends). The file is removed only by :func:`remove_private`, still locked, once the outputs
    exist: a run that locks the removed file then finds them and refuses OUT."""

    def __init__(self, out: Path) -> None:
        self.fd: int | None = os.open(out / PRIVATE / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            logger.warning("no fcntl.flock on this platform: out_dir %s is not locked against other runs", out)
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise OutDirError(f"out_dir {str(out)!r} is in use by another fastunlearn run (pid {pid})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor of the open file releases its flock
            self.fd = None

    __del__ = release


def claim(out: Path) -> OutDirLock:
    """Check OUT, create it (and PRIVATE), lock it, mark it as a run directory and clear the temporaries a
    killed run left; OutDirError (one line) when OUT cannot be used."""
    check_usable(out)
    try:
        (out / PRIVATE).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "cannot create out_dir" if not out.is_dir() else "cannot write to out_dir"
        raise OutDirError(f"{what} {str(out)!r}: {exc.strerror or exc}") from None
    try:
        lock = OutDirLock(out)
    except OutDirError:
        raise
    except OSError as exc:  # a read-only file system, a lock file not ours to write
        raise OutDirError(f"out_dir {str(out)!r} is not writable ({exc.strerror or exc})") from None
    try:
        if not (out / PRIVATE / MARKER).is_file():
            atomic_write(out / PRIVATE / MARKER, json.dumps({"fastunlearn_run_dir": 1}) + "\n", durable=True)
        shutil.rmtree(out / PRIVATE / SCRATCH, ignore_errors=True)  # every temporary there is a run's
    except BaseException:
        lock.release()
        raise
    return lock


def check_fresh(out: Path) -> None:
    """A run without a checkpoint to resume starts only in an OUT with nothing but PRIVATE in it."""
    if any(p.name != PRIVATE for p in out.iterdir()):
        raise not_fresh(out)


def not_fresh(out: Path) -> OutDirError:
    return OutDirError(f"out_dir {str(out)!r} is not empty and holds no checkpoint to resume (a finished run, or "
                       f"files of yours): choose a new or empty out_dir")  # fmt: skip


def remove_private(out: Path) -> None:
    """PRIVATE, once the run's outputs are complete and its checkpoint removed; the lock file last."""
    private = out / PRIVATE
    for path in private.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (private / LOCK).unlink()
    private.rmdir()
