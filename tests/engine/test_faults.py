"""Faults a run must survive or refuse with one line: a used or unwritable out_dir, a kill at any instant of a
checkpoint save, a second run on the same out_dir, a resume with another model, a corrupt checkpoint."""

from __future__ import annotations

import builtins
import copy
import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastunlearn.engine import UnlearnConfig, checkpoint, outdir, outputs, recipe, unlearn
from tests.helpers.runs import FAULT_CONFIG as CONFIG
from tests.helpers.runs import FAULT_DATA as DATA
from tests.helpers.runs import FAULT_EPOCHS as MAX_EPOCHS
from tests.helpers.runs import Interrupt, stop_at
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- output directory and checkpoints


class Killed(BaseException):
    """The process died here: not an Exception, so no handler meant for errors catches it."""


def run(out: Path, model=None, **options):
    config = UnlearnConfig(**{**CONFIG, **options.pop("config", {})})
    return unlearn(copy.deepcopy(tiny_model("gpt_neo")) if model is None else model, DATA, config, out, **options)


def interrupted(out: Path, epoch: int = 1) -> Path:
    """out_dir of a run stopped after ``epoch``'s checkpoint was written."""
    with pytest.raises(Interrupt):
        run(out, on_epoch_end=stop_at(epoch))
    return out


def epochs(log: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if not k.endswith("_s")} for t in log["tasks"] for e in t["epochs"]]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_run(result, reference) -> None:
    assert epochs(result.log) == epochs(reference.log) and len(epochs(result.log)) == MAX_EPOCHS
    got, expected = trainable(result.model), trainable(reference.model)
    assert got.keys() == expected.keys() and len(got) > 0
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def checkpoint_file(out: Path, name: str) -> Path:
    (path,) = out.rglob(name)  # the one checkpoint's file, wherever the layout keeps it
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("reference") / "run")


def test_an_unrelated_out_dir_is_refused_before_anything_in_it_changes(tmp_path):
    out = tmp_path / "mine"
    (out / ".thesis.tmp-drafts").mkdir(parents=True)
    (out / ".thesis.tmp-drafts" / "ch1.txt").write_text("chapter one")
    (out / ".budget.xlsx.tmp-1").write_bytes(b"numbers")
    before = tree(out)
    with pytest.raises(
        FileExistsError, match=f"out_dir '{out}' is not empty and holds no checkpoint to resume"
    ) as error:
        run(out)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)  # the CLI's one-line exit 2
    assert tree(out) == before


def test_only_the_runs_own_folder_is_cleaned_and_user_files_in_a_run_dir_stay(tmp_path, reference):
    out = interrupted(tmp_path / "run")
    (out / "notes.txt").write_text("mine")  # the user's, next to an interrupted run
    (out / ".notes.txt.tmp-0123456789ab").write_text("mine too")  # looks like a temporary: still not ours
    assert_same_run(run(out), reference)
    assert (out / "notes.txt").read_text() == "mine" and (out / ".notes.txt.tmp-0123456789ab").exists()


def test_a_finished_run_keeps_only_its_outputs_and_is_not_run_again(tmp_path, reference):
    out = reference.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.json", "merged", "metrics.png", "report.md"]
    with pytest.raises(outdir.RunFinished, match="holds this run, already finished"):
        run(out)


# ---- a kill at any filesystem step of a checkpoint save
FS_STEPS = [(os, "open"), (os, "write"), (os, "fsync"), (os, "replace"), (os, "rename"), (os, "mkdir"),
            (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"), (builtins, "open"), (io, "open"),
            (checkpoint, "save_file")]  # fmt: skip


class FaultInjector:
    """Counts the filesystem calls made inside the ``arm_on`` calls of ``functions`` (counted together,
    1-based) and kills the process at call ``kill_at``: that call and every later one raise ``Killed`` (a
    dead process does nothing more)."""

    def __init__(self, monkeypatch, functions: list[tuple], arm_on: set[int], kill_at: int) -> None:
        self.kill_at, self.entered, self.calls, self.armed = kill_at, 0, 0, False
        for module, name in FS_STEPS:
            monkeypatch.setattr(module, name, self.step(getattr(module, name)))
        for module, name in functions:
            monkeypatch.setattr(module, name, self.arming(getattr(module, name), arm_on))

    def arming(self, function, arm_on: set[int]):
        def call(*args, **kwargs):
            self.entered += 1
            self.armed = self.entered in arm_on
            try:
                return function(*args, **kwargs)
            finally:
                self.armed = False

        return call

    def step(self, function):
        def call(*args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls >= self.kill_at:
                    raise Killed(f"killed at filesystem call {self.calls}")
            return function(*args, **kwargs)

        return call


@pytest.fixture
def quick_files(monkeypatch):
    """No metrics.png (most of a tiny run's time) and no real fsync (a flush to the disk: what a kill
    interrupts is the same without it); the fault injector still counts and kills at every fsync call."""
    monkeypatch.setattr(outputs, "write_plot", lambda path, log: None)
    monkeypatch.setattr(os, "fsync", lambda fd: None)


SAVE = [(checkpoint, "save_checkpoint")]
FINISH = [(checkpoint, "remove_checkpoints"), (outdir, "remove_private")]  # after the outputs are written


@pytest.mark.parametrize(
    "functions, arm_on",
    [(SAVE, {1}), (SAVE, {2}), (FINISH, {1, 2})],
    ids=["first-save", "replacing-save", "removal-at-the-end"],
)
def test_a_kill_at_any_filesystem_step_of_the_checkpoint_resumes_to_the_uninterrupted_result(
    functions, arm_on, tmp_path, monkeypatch, reference, quick_files
):
    kill_at = 1
    while True:
        out = tmp_path / f"kill-{kill_at}"
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, functions, arm_on, kill_at)
            try:
                run(out)
            except Killed:
                pass
            else:  # the save had fewer steps than kill_at: every step was tried
                break
        outputs_written = (out / "report.md").exists()
        try:
            result = run(out)  # the same call again, as after a kill
        except outdir.RunFinished:  # killed after the outputs were complete: the rerun says so, removes the rest
            assert outputs_written
            assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.json", "merged", "report.md"]
            assert epochs(json.loads((out / "log.json").read_text())) == epochs(reference.log)
            adapter = "adapter/adapter_model.safetensors"
            got, expected = load_file(out / adapter), load_file(reference.out_dir / adapter)
            assert all(torch.equal(got[k], expected[k]) for k in expected) and got.keys() == expected.keys()
        else:
            assert_same_run(result, reference)
            if arm_on == {2}:  # never a moment without a complete checkpoint: the setup's, or a later one
                assert result.log["resumes"] == 1
            assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.json", "merged", "report.md"]  # no plot
        kill_at += 1
    print(f"{functions[0][1]} {arm_on}: killed at each of {injector.calls} filesystem calls")
    assert injector.calls >= 3, f"only {injector.calls} filesystem calls were armed: nothing was tested"


# ---- one run at a time on an out_dir
def test_a_second_run_on_an_out_dir_in_use_fails_at_once(tmp_path, reference):
    out = tmp_path / "run"
    errors = []

    def second_run(task: int, record: dict) -> None:
        if record["epoch"] == 1:  # the first run holds out_dir: a second one (another config) must not start
            with pytest.raises(FileExistsError) as error:
                run(out, config={"lr": 5e-3})
            errors.append(error.value)

    assert_same_run(run(out, on_epoch_end=second_run), reference)
    (error,) = errors
    assert str(error) == f"out_dir '{out}' is in use by another fastunlearn run (pid {os.getpid()})"
    assert isinstance(error, ValueError)


def test_the_lock_is_released_when_a_run_fails(tmp_path, reference):
    out = interrupted(tmp_path / "run")
    assert_same_run(run(out), reference)  # the interrupted run let go of out_dir


# ---- what a resume checks
def test_resuming_with_another_model_is_refused(tmp_path):
    out = interrupted(tmp_path / "run")
    with pytest.raises(
        ValueError,
        match=f"out_dir '{out}' holds a run of another model \\(fingerprint [0-9a-f]{{12}}"
        " in the checkpoint, [0-9a-f]{12} given\\): .*remove it to start fresh",
    ):
        run(out, model=tiny_model("gpt_neo", seed=1))


def test_resume_false_with_a_checkpoint_is_a_one_line_error(tmp_path):
    out = interrupted(tmp_path / "run")
    with pytest.raises(FileExistsError, match="holds the checkpoint of an interrupted run.*pass resume=True") as error:
        run(out, resume=False)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def flip_a_parameter_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in header if k.startswith("param."))
    start, end = header[name]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x40  # a float's exponent bit: a huge or tiny weight
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_text(path.read_text()[:-7] + "\x00garbled")


@pytest.mark.parametrize(
    "name, damage",
    [
        ("state.safetensors", flip_a_parameter_byte),
        ("state.safetensors", truncate),
        ("state.json", garble),
        ("manifest.json", garble),
    ],  # fmt: skip
    ids=["flipped-byte", "truncated", "garbled-log", "garbled-manifest"],
)
def test_a_corrupt_checkpoint_is_refused_naming_the_file(name, damage, tmp_path):
    out = interrupted(tmp_path / "run")
    path = checkpoint_file(out, name)
    damage(path)
    with pytest.raises(ValueError, match=f"checkpoint file '{path}' is (corrupt|unreadable)") as error:
        run(out)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_a_lost_pointer_falls_back_to_the_newest_complete_checkpoint(damage, tmp_path, reference):
    out = interrupted(tmp_path / "run", epoch=1)
    pointer = out / ".fastunlearn" / "checkpoint.json"
    assert json.loads(pointer.read_text())["version"] == 2  # the setup's, then epoch 1's
    pointer.unlink() if damage == "missing" else garble(pointer)
    result = run(out)
    assert_same_run(result, reference)
    assert result.log["resumes"] == 1


# ---- an out_dir that cannot be written is refused before any compute
@pytest.fixture
def no_compute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the run computed before checking out_dir")

    monkeypatch.setattr(recipe, "setup_params", fail)
    monkeypatch.setattr(recipe.evaluation, "baseline", fail)


def test_an_out_dir_under_a_file_is_refused_before_any_compute(tmp_path, no_compute):
    (tmp_path / "report.pdf").write_text("a file")
    out = tmp_path / "report.pdf" / "run"
    with pytest.raises(FileExistsError, match=f"cannot create out_dir '{out}'") as error:
        run(out)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_an_out_dir_without_write_permission_is_refused_before_any_compute(tmp_path, no_compute, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != out)  # as for a user
    with pytest.raises(FileExistsError, match=f"out_dir '{out}' is not writable") as error:
        run(out)
    assert isinstance(error.value, ValueError) and not any(out.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory: chmod cannot block it")
def test_a_read_only_out_dir_is_refused_before_any_compute(tmp_path, no_compute):
    out = tmp_path / "run"
    out.mkdir(mode=0o555)
    try:
        with pytest.raises(FileExistsError, match=f"out_dir '{out}' is not writable"):
            run(out)
    finally:
        out.chmod(0o755)
