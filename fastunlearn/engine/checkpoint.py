"""The checkpoint of a run: trainable tensors, AdamW state and random states in safetensors, the log in JSON.

No pickle. Rank 0 writes the full (gathered) state; every rank reads it. Layout, in ``OUT/.fastunlearn/``:

- ``checkpoint-NNNNNN/`` (a version, N = 1, 2, ...): ``state.safetensors``, ``state.json`` (the log) and
  ``manifest.json`` (the size and sha256 of both, and ``model_fingerprint`` of the model as given);
- ``checkpoint.json``: the pointer, naming the latest complete version.

A save writes version N+1 in a temporary folder, fsyncs it, renames it into place, then replaces the pointer
(temporary file, fsync, ``os.replace``) and only then removes the older versions: at every instant a complete
version exists and the pointer names one (or, before the first pointer, none is needed). A resume takes the
pointer's version; with the pointer missing or unreadable (a kill before the first one was written, a damaged
disk), the newest complete version, with a warning. A damaged checkpoint is a one-line :class:`CheckpointError`
naming the file: a version that fails its manifest (a flipped byte, a truncated or garbled file), the pointer's
version without its manifest or folder, versions without a complete one; a resume never falls back to an older
version. A resume with another model (another fingerprint) is refused. A version is removed manifest first:
the remains of a removal a kill interrupted are not a version to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastunlearn.engine import outdir, parallel
from fastunlearn.engine.inputs import model_fingerprint
from fastunlearn.lora.layer import lora_layers
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.atomic import PRIVATE, atomic_directory, atomic_write, write_file

POINTER = "checkpoint.json"
MANIFEST = "manifest.json"
FILES = ("state.safetensors", "state.json")  # what the manifest covers
VERSION = re.compile(r"checkpoint-(\d{6,})")
FORMAT = 2

logger = logging.getLogger("fastunlearn.engine")
SameRun = Callable[[dict, str], "str | None"]  # (a finished run's log, model fingerprint) -> what differs, or None


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (a file unreadable or not matching its manifest); one line."""


@dataclass
class Prepared:
    """What ``prepare_out_dir_on_all_ranks`` found: rank 0's lock, the fingerprint to record (rank 0), and
    the checkpoint to resume (``version`` 0, ``saved`` and ``log`` None: a fresh run)."""

    lock: outdir.OutDirLock | None
    fingerprint: str | None
    version: int = 0
    saved: dict | None = None
    log: dict | None = None


def versions(out: Path, complete: bool = True) -> dict[int, Path]:
    """The checkpoint versions in OUT's private folder, by number. Each is complete when renamed in; a removal
    deletes its manifest first, so ``complete=False`` adds the remains of one a kill interrupted."""
    private = out / PRIVATE
    found = (VERSION.fullmatch(p.name) for p in private.iterdir()) if private.is_dir() else ()
    paths = {int(m[1]): private / m[0] for m in found if m is not None}
    return {v: path for v, path in paths.items() if not complete or (path / MANIFEST).is_file()}


def has_checkpoint(out: Path) -> bool:
    """Whether OUT holds a checkpoint (complete, not necessarily verified) to resume."""
    return bool(versions(out))


def _remove_version(path: Path) -> None:
    (path / MANIFEST).unlink(missing_ok=True)  # first: from here on, not a version to resume
    shutil.rmtree(path)


def save_checkpoint(out: Path, model: nn.Module, optimizer, generator: torch.Generator, log: dict,
                    fingerprint: str | None, extra: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Rank 0 writes the next version of the full state (every rank must call: under FSDP it is gathered).
    ``extra``: more named tensors to keep (NPO's reference log-likelihoods, ``engine.reference``)."""
    tensors = {f"param.{n}": t.contiguous() for n, t in parallel.trainable_state(model).items()}
    tensors.update(extra or {})
    for name, layer in lora_layers(model).items():
        if layer.lora_a0 is not None:
            tensors[f"buffer.{name}.lora_a0"] = layer.lora_a0.contiguous()
            tensors[f"buffer.{name}.lora_b0"] = layer.lora_b0.contiguous()
    if optimizer is not None:
        for index, state in parallel.optimizer_state(model, optimizer).items():
            tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
    if not dist_utils.current().is_main:
        return
    tensors["rng.torch"], tensors["rng.data"] = torch.get_rng_state(), generator.get_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # this process's GPU only: touching the others would start a context on each
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    older = versions(out, complete=False)
    version = max(older, default=0) + 1
    with atomic_directory(out / PRIVATE / f"checkpoint-{version:06d}", durable=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_file(tmp / "state.json", json.dumps({"format": FORMAT, "log": log}, indent=1).encode())
        manifest = {"format": FORMAT, "model_fingerprint": fingerprint, "files": {n: digest(tmp / n) for n in FILES}}
        write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    atomic_write(out / PRIVATE / POINTER, json.dumps({"version": version}) + "\n", durable=True)
    for path in older.values():  # only now: the pointer names the new, complete version
        _remove_version(path)


def remove_checkpoints(out: Path) -> None:
    """The finished run's checkpoint: the pointer, then every version (a kill in between leaves a version
    that resumes and rewrites the same outputs, or none)."""
    (out / PRIVATE / POINTER).unlink(missing_ok=True)
    for path in versions(out, complete=False).values():
        _remove_version(path)


def digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**22):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def verify(path: Path) -> dict:
    """``path``'s manifest, once every file it lists matches its size and sha256; CheckpointError if not."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files, _ = manifest["files"], manifest["model_fingerprint"]
        if (
            manifest["format"] != FORMAT
            or sorted(files) != sorted(FILES)
            or any(type(v) is not dict for v in files.values())
        ):
            raise ValueError(f"format {manifest['format']}, files {sorted(files)}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _refusal(path / MANIFEST, f"unreadable ({_reason(exc)})") from None
    for name, expected in files.items():
        try:
            got = digest(path / name)
        except OSError as exc:
            raise _refusal(path / name, f"unreadable ({_reason(exc)})") from None
        if got != expected:
            found = f"{got['bytes']} bytes, sha256 {got['sha256'][:12]}"
            recorded = f"{expected.get('bytes')} bytes, {str(expected.get('sha256'))[:12]}"
            raise _refusal(path / name, f"corrupt ({found}; its manifest says {recorded})")
    return manifest


def _refusal(file: Path, why: str, out: Path | None = None) -> CheckpointError:
    out = out or file.parent.parent.parent  # OUT/.fastunlearn/checkpoint-NNNNNN/file
    return CheckpointError(f"checkpoint file {str(file)!r} is {why}: the interrupted run's checkpoint is damaged, "
                           f"cannot resume; remove out_dir {str(out)!r} to start fresh")  # fmt: skip


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())  # one line


def _pointer(out: Path) -> int | None:
    """The version the pointer names; None when it is missing or unreadable."""
    try:
        version = json.loads((out / PRIVATE / POINTER).read_bytes())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None


def latest(out: Path) -> tuple[int, dict] | None:
    """(version, manifest) of the checkpoint to resume, verified; None when OUT holds none; CheckpointError
    naming the file when it is damaged (never an older version instead)."""
    found, every = versions(out), versions(out, complete=False)
    named, pointer = _pointer(out), out / PRIVATE / POINTER
    if named is not None:
        if named in found:
            return named, verify(found[named])
        folder = out / PRIVATE / f"checkpoint-{named:06d}"
        missing = folder / MANIFEST if folder.is_dir() else folder
        raise _refusal(missing, f"missing (the pointer {str(pointer)!r} names version {named})", out)
    if found:  # no usable pointer: a kill before the first one, or a damaged disk
        newest = max(found)
        if pointer.exists():
            logger.warning("checkpoint pointer %s is unreadable: resuming from the newest complete version, %s",
                           pointer, found[newest])  # fmt: skip
        return newest, verify(found[newest])
    if every:  # versions, none complete: their manifests are gone
        raise _refusal(every[max(every)] / MANIFEST, "missing", out)
    if pointer.exists():
        raise _refusal(pointer, "unreadable and no checkpoint version is left", out)
    return None


def load(out: Path, version: int) -> tuple[dict, dict]:
    """(tensors, log) of a version (verified by rank 0)."""
    path = out / PRIVATE / f"checkpoint-{version:06d}"
    try:
        return load_file(str(path / "state.safetensors")), json.loads((path / "state.json").read_bytes())["log"]
    except Exception as exc:  # noqa: BLE001 - the safetensors reader raises its own error type
        raise _refusal(path / "state.safetensors", f"unreadable ({_reason(exc)})") from None


def prepare_out_dir_on_all_ranks(out: Path, resume: bool, process, model: nn.Module,
                                 same_run: SameRun | None = None) -> Prepared:  # fmt: skip
    """Rank 0 claims out_dir (``outdir.claim``: checks, lock, marker) and finds the checkpoint to resume;
    an error there is raised on every rank; then the other ranks read the same version. Resuming on several
    processes needs out_dir on a shared file system. An out_dir holding a finished run: ``outdir.RunFinished``
    when ``same_run(its log, this model's fingerprint)`` finds no difference, else a refusal saying what
    differs."""
    prepared, error = None, None
    if process.is_main:
        try:
            prepared = _prepare_main(out, resume, model, same_run)
        except (OSError, ValueError) as exc:
            error = exc
    dist_utils.raise_together(error)
    if not process.distributed:
        return prepared
    (version,) = dist_utils.all_reduce_sum([prepared.version if process.is_main else 0])
    if process.is_main:
        return prepared
    return Prepared(None, None, version, *load(out, version)) if version else Prepared(None, None)


def _prepare_main(out: Path, resume: bool, model: nn.Module, same_run: SameRun | None) -> Prepared:
    finished = outdir.finished_log(out) if out.is_dir() else None
    if finished is not None:
        _finished(out, finished, model_fingerprint(model), same_run)
    lock = outdir.claim(out)
    try:
        if has_checkpoint(out) and not resume:
            raise outdir.OutDirError(
                f"out_dir {str(out)!r} holds the checkpoint of an interrupted run: pass resume=True (drop "
                f"--no-resume) to continue it, or remove it or choose another out_dir to start fresh"
            )
        fingerprint = model_fingerprint(model)  # the model as given: before its dtype, adapters, sharding
        found = latest(out)
        if found is None:
            outdir.check_fresh(out)
            return Prepared(lock, fingerprint)
        version, manifest = found
        if manifest["model_fingerprint"] != fingerprint:
            raise ValueError(
                f"out_dir {str(out)!r} holds a run of another model (fingerprint {manifest['model_fingerprint'][:12]}"
                f" in the checkpoint, {fingerprint[:12]} given): resume with the same model, or use another "
                f"out_dir (--out) or remove it to start fresh"
            )
        return Prepared(lock, fingerprint, version, *load(out, version))
    except BaseException:
        lock.release()
        raise


def _finished(out: Path, log: dict, fingerprint: str, same_run: SameRun | None) -> None:
    """out_dir holds a finished run: RunFinished when it is this one (then the remains of its PRIVATE, when a
    kill interrupted their removal, are removed), else OutDirError saying what differs."""
    try:
        differs = "run" if same_run is None else same_run(log, fingerprint)
    except (KeyError, TypeError, ValueError, AttributeError):
        differs = "run (a log.json this version cannot compare)"
    if differs is not None:
        raise outdir.OutDirError(f"out_dir {str(out)!r} holds a finished run with another {differs}: choose a new "
                                 f"or empty out_dir")  # fmt: skip
    state = outdir.private_state(out)
    if state == "ours":
        lock = outdir.claim(out)
        try:
            remove_checkpoints(out)
            outdir.remove_private(out)
        finally:
            lock.release()
    elif state == "unclaimed":  # a kill removing PRIVATE left it empty
        outdir.remove_private(out)
    raise outdir.RunFinished(out, log)


def load_params_and_rng(model: nn.Module, saved: dict, generator: torch.Generator) -> None:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {k.removeprefix("param.") for k in saved if k.startswith("param.")}
    if names != set(trainable):
        raise ValueError(
            f"the checkpoint's trainable parameters differ from this model's: only in the checkpoint "
            f"{sorted(names - set(trainable))[:3]}, only in the model {sorted(set(trainable) - names)[:3]}"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[f"param.{name}"])
    torch.set_rng_state(saved["rng.torch"])
    generator.set_state(saved["rng.data"])
    device = next(model.parameters()).device
    if "rng.cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng.cuda"], device)


def load_optimizer(model: nn.Module, optimizer, saved: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in saved.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    parallel.load_optimizer_state(model, optimizer, state)
