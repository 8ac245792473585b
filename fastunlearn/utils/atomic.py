"""Atomic file output: a reader, or a run killed at any instant, never sees a partial file or directory.

Everything is first written under a temporary name (``.NAME.tmp-HEX``) and renamed into place with
``os.replace``. The temporary lives in the target's folder (the same file system, so the rename is atomic),
or, when that folder is a run directory (it holds the run's own folder ``PRIVATE`` with the marker a run wrote
into it, see ``fastunlearn.engine.outdir``), in ``PRIVATE/tmp/``: what a killed writer left there is the run's
to remove, and nothing next to the user's files ever is. A folder named ``PRIVATE`` without the marker is the
user's: nothing is written into it. ``durable=True`` also fsyncs the data and the folder before
and after the rename, so the new file survives a power loss, not only a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

PRIVATE = ".fastunlearn"  # a run directory's own folder: marker, lock, checkpoints, temporaries (engine.outdir)
SCRATCH = "tmp"  # PRIVATE's folder of temporaries
MARKER = "run.json"  # PRIVATE's marker, written first by the run that created PRIVATE: {"fastunlearn_run_dir": 1,
# "run_id": HEX}; a folder is a run's own only with it (earlier versions wrote no run_id)


def marker_run_id(private: Path) -> str | None:
    """The run id in ``private``'s marker ("" for an earlier version's marker without one); None when
    ``private`` holds no valid marker (then it is not a run's folder)."""
    try:
        marker = json.loads((private / MARKER).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("fastunlearn_run_dir") != 1:
        return None
    run_id = marker.get("run_id", "")
    return run_id if isinstance(run_id, str) else None


def scratch_for(target: Path) -> Path:
    """The folder ``target``'s temporary is written in: ``PRIVATE/tmp/`` of a run directory (target in the
    run directory or in its ``PRIVATE``, which holds a run's marker), else target's own folder."""
    parent = target.parent
    private = parent if parent.name == PRIVATE else parent / PRIVATE
    if not private.is_dir() or marker_run_id(private) is None:
        return parent
    scratch = private / SCRATCH
    scratch.mkdir(exist_ok=True)
    return scratch


def write_file(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` (created or truncated; not atomic: for files inside a temporary directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_for(path) / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        write_file(tmp, data.encode() if isinstance(data, str) else data, durable)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, durable: bool = False,
                     keep: bool = False) -> Iterator[Path]:  # fmt: skip
    """Yield an empty temporary directory that becomes ``out_dir`` when the block succeeds.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was. ``durable``: every
    file and folder written is fsynced before the rename, and ``out_dir``'s parent after it. ``keep`` (implies
    ``overwrite``): an existing ``out_dir`` is updated, not replaced: each entry of the new content is renamed
    into it (one ``os.replace`` each), and its entries the new content lacks (files the writer did not write)
    stay as they are.
    """
    target = Path(os.path.abspath(out_dir))
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"out_dir {str(target)!r} exists and is not a directory")
        if not (overwrite or keep) and any(target.iterdir()):
            raise FileExistsError(f"out_dir {str(target)!r} is not empty (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_for(target) / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if durable:
            for folder, _, files in os.walk(tmp, topdown=False):
                for name in files:
                    fsync_path(Path(folder) / name)
                fsync_path(Path(folder))
        if keep and target.exists():
            _update(target, tmp)
            if durable:
                fsync_path(target)
        elif target.exists():  # empty, or overwrite: set it aside until the new one is in place
            old = tmp.with_name(tmp.name + "-old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        if durable:
            fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _update(target: Path, new: Path) -> None:
    """Rename each entry of ``new`` into ``target`` (a folder both hold: the old one is set aside in ``new``
    first and removed with it); ``target``'s other entries are not touched."""
    for entry in sorted(new.iterdir()):
        if entry.name.startswith(".old-"):
            continue
        place = target / entry.name
        if entry.is_dir() and place.is_dir() and not place.is_symlink():
            os.replace(place, new / f".old-{entry.name}")
        os.replace(entry, place)
