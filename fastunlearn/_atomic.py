"""Atomic file output: a reader, or a run killed at any instant, never sees a partial file or directory.

Everything is first written under a temporary name next to its target (``TEMPORARY``: ``.NAME.tmp-HEX``)
and renamed into place with ``os.replace``. ``remove_stale_temporaries`` clears what a killed writer left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMPORARY = ".*.tmp-*"  # the names atomic_write and atomic_directory write to before renaming


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary files and directories an interrupted run left in ``out_dir`` (if it exists)."""
    for stale in out_dir.glob(TEMPORARY) if out_dir.is_dir() else ():
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out_dir`` that becomes ``out_dir`` when the block succeeds.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    target = Path(os.path.abspath(out_dir))
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"out_dir {str(target)!r} exists and is not a directory")
        if not overwrite and any(target.iterdir()):
            raise FileExistsError(f"out_dir {str(target)!r} is not empty (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():  # empty, or overwrite: set it aside until the new one is in place
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
