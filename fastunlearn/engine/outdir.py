"""The output directory of a run, ``OUT``: the outputs at its top, everything else in the run's own folder
``OUT/.fastunlearn/`` (``PRIVATE``):

- ``run.json``: the marker (``fastunlearn.utils.atomic.MARKER``, holding a run id), written first by the run that
  creates PRIVATE; a folder named PRIVATE is the run's own only with it: recognized by what a run wrote into it,
  never by its name;
- ``lock``: locked (``fcntl.flock``, exclusive) by the run using OUT for as long as it runs; holds its pid;
- ``checkpoint.json`` and ``checkpoint-NNNNNN/``: the checkpoint (``engine.checkpoint``);
- ``tmp/``: the temporaries of every atomic write in OUT (``fastunlearn.utils.atomic``), cleared when a run starts.

A finished run removes PRIVATE (the checkpoint first, then its other files, the lock file, the marker last:
a run that locked the removed lock file meanwhile finds the finished outputs). A run deletes only inside a
marked PRIVATE, and replaces only the paths it writes. It refuses, before touching anything, an OUT that is a
file, or neither missing, empty nor a run directory (a PRIVATE without a marker included: the user's folder,
or an interrupted run whose marker was lost); an OUT it cannot write, before any compute; and an OUT another
run holds, at once. An OUT holding a finished run (its ``log.json`` says so) is reported as finished
(:class:`RunFinished`) when it is the same run, and refused otherwise. Only rank 0 of a multi-process run
claims OUT.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from fastunlearn.utils.atomic import MARKER, PRIVATE, SCRATCH, fsync_path, marker_run_id, write_file

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK = "lock"
LOG = "log.json"  # the run's log at OUT's top; "status": "finished" once its outputs are complete

logger = logging.getLogger("fastunlearn.engine")


class OutDirError(FileExistsError, ValueError):
    """out_dir cannot be used as asked; the message (one line) names it, says why and what to do. Both a
    FileExistsError and a ValueError: a user's mistake, not a failure of the run."""


class RunFinished(OutDirError):
    """out_dir holds this run, finished (same model, data and config): nothing to do. ``log``: its log.json."""

    def __init__(self, out: Path, log: dict) -> None:
        self.out, self.log = out, log
        super().__init__(f"out_dir {str(out)!r} holds this run, already finished (same model, data and config): "
                         f"nothing to do; to run it again, remove out_dir or choose another one")  # fmt: skip


def private_state(out: Path) -> str:
    """What OUT's PRIVATE is: "missing"; "ours" (it holds a run's marker); "unclaimed" (empty, or holding only
    the empty marker of a run killed while creating it: nothing in it to lose); "foreign" (anything else)."""
    private = out / PRIVATE
    if not private.exists() and not private.is_symlink():
        return "missing"
    if not private.is_dir() or private.is_symlink():
        return "foreign"
    if marker_run_id(private) is not None:
        return "ours"
    entries = list(private.iterdir())
    if not entries or (len(entries) == 1 and entries[0].name == MARKER and _empty_file(entries[0])):
        return "unclaimed"
    return "foreign"


def _empty_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == 0


def is_run_dir(out: Path) -> bool:
    """OUT's PRIVATE holds a run's marker."""
    return private_state(out) == "ours"


def check_usable(out: Path) -> None:
    """Refuse an OUT that is a file, holds someone else's files, or cannot be written; touches nothing."""
    name = repr(str(out))
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out_dir {name} exists and is not a directory")
    if not out.exists():
        return
    state = private_state(out)
    if state == "foreign":
        raise foreign_private(out)
    if state != "ours" and any(p.name != PRIVATE for p in out.iterdir()):
        raise not_fresh(out)
    if not os.access(out, os.W_OK | os.X_OK) or (
        (out / PRIVATE).is_dir() and not os.access(out / PRIVATE, os.W_OK | os.X_OK)
    ):
        raise OutDirError(f"out_dir {name} is not writable")


def foreign_private(out: Path) -> OutDirError:
    """The refusal of a PRIVATE without a marker: an interrupted run's whose marker was lost (it holds a
    checkpoint), or the user's own folder of that name."""
    private, marker = out / PRIVATE, out / PRIVATE / MARKER
    if private.is_dir() and any(p.name.startswith("checkpoint") for p in private.iterdir()):
        return OutDirError(f"out_dir {str(out)!r} holds an interrupted run whose marker file {str(marker)!r} is "
                           f"missing or damaged: cannot resume; remove out_dir to start fresh")  # fmt: skip
    return OutDirError(f"out_dir {str(out)!r} holds a folder {PRIVATE!r} that no fastunlearn run wrote (no marker "
                       f"{MARKER} in it): move it away or choose another out_dir")  # fmt: skip


class OutDirLock:
    """An exclusive ``flock`` on ``OUT/.fastunlearn/lock`` (released by :meth:`release`, or when the process
    ends, however it ends). The file is removed only by :func:`remove_private`, still locked, once the outputs
    exist: a run that locks the removed file then finds the finished run."""

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
    """Check OUT, create it and PRIVATE, mark PRIVATE as this run's (unless it is a run's already), lock it and
    clear the temporaries a killed run left; OutDirError (one line) when OUT cannot be used."""
    check_usable(out)
    private = out / PRIVATE
    try:
        private.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "cannot create out_dir" if not out.is_dir() else "cannot write to out_dir"
        raise OutDirError(f"{what} {str(out)!r}: {exc.strerror or exc}") from None
    if marker_run_id(private) is None:  # missing or unclaimed (check_usable): ours from here on
        write_marker(private)
    try:
        lock = OutDirLock(out)
    except OutDirError:
        raise
    except OSError as exc:  # a read-only file system, a lock file not ours to write
        raise OutDirError(f"out_dir {str(out)!r} is not writable ({exc.strerror or exc})") from None
    try:
        shutil.rmtree(private / SCRATCH, ignore_errors=True)  # every temporary there is a run's
    except BaseException:
        lock.release()
        raise
    return lock


def write_marker(private: Path) -> None:
    """PRIVATE's marker with a new run id: one small write, fsynced; a kill leaves it whole or empty. A failed
    write (a full disk) removes it again: PRIVATE is then empty (unclaimed) as before."""
    marker = json.dumps({"fastunlearn_run_dir": 1, "run_id": uuid.uuid4().hex}) + "\n"
    try:
        write_file(private / MARKER, marker.encode(), durable=True)
        fsync_path(private)
    except OSError as exc:
        (private / MARKER).unlink(missing_ok=True)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutDirError(f"out_dir {str(private.parent)!r} is not writable ({exc.strerror})") from None
        raise


def check_fresh(out: Path) -> None:
    """A run without a checkpoint to resume starts only in an OUT with nothing but PRIVATE in it; an OUT whose
    log.json is a running run's lost its checkpoint (damaged)."""
    if any(p.name != PRIVATE for p in out.iterdir()):
        try:
            running = json.loads((out / LOG).read_bytes()).get("status") == "running"
        except (OSError, ValueError, AttributeError):
            running = False
        if running:
            raise OutDirError(f"out_dir {str(out)!r} holds an interrupted run whose checkpoint is missing (nothing to "
                              f"resume in {str(out / PRIVATE)!r}): remove out_dir to start fresh")  # fmt: skip
        raise not_fresh(out)


def not_fresh(out: Path) -> OutDirError:
    return OutDirError(f"out_dir {str(out)!r} is not empty and holds no checkpoint to resume nor a finished run "
                       f"(files of yours): choose a new or empty out_dir")  # fmt: skip


def finished_log(out: Path) -> dict | None:
    """The log of the finished run OUT holds (``log.json`` at its top: written last, once every output is
    complete), or None."""
    try:
        log = json.loads((out / LOG).read_bytes())
    except (OSError, ValueError):
        return None
    ok = isinstance(log, dict) and log.get("status") == "finished"
    return log if ok and isinstance(log.get("config"), dict) and isinstance(log.get("data"), dict) else None


def remove_private(out: Path) -> None:
    """PRIVATE, once the run's outputs are complete and its checkpoint removed: its files, the lock file (still
    locked), the marker last (a kill before leaves a marked PRIVATE, after it an empty one)."""
    private = out / PRIVATE
    for path in private.iterdir():
        if path.name not in (LOCK, MARKER):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (private / LOCK).unlink(missing_ok=True)
    (private / MARKER).unlink(missing_ok=True)
    try:
        private.rmdir()
    except OSError as exc:  # a run that started meanwhile holds a new lock file there: it removes PRIVATE
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
