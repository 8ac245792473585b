"""What a run may touch and what it reports: its own folder is recognized by the marker it wrote (a user's folder of
that name is refused untouched), a user's file in an output folder stays, a copy of the model is the same model, a
damaged checkpoint is named (never an older version instead), and a finished run is reported as finished."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, checkpoint, unlearn
from fastunlearn.engine.inputs import model_fingerprint
from fastunlearn.engine.outdir import OutDirError, RunFinished
from fastunlearn.utils.atomic import PRIVATE
from tests.helpers.runs import FAULT_CONFIG as CONFIG
from tests.helpers.runs import FAULT_DATA as DATA
from tests.helpers.runs import Interrupt, stop_at, token_set
from tests.helpers.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, model=None, data=DATA, **options):
    config = UnlearnConfig(**{**CONFIG, **options.pop("config", {})})
    return unlearn(copy.deepcopy(tiny_model("gpt_neo")) if model is None else model, data, config, out, **options)


def interrupted(out: Path, epoch: int = 1, **options) -> Path:
    with pytest.raises(Interrupt):
        run(out, on_epoch_end=stop_at(epoch), **options)
    return out


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("reference") / "run")


def assert_same_run(result, reference) -> None:
    got, expected = trainable(result.model), trainable(reference.model)
    assert got.keys() == expected.keys() and len(got) > 0
    assert all(torch.equal(got[name], value) for name, value in expected.items())


# ---- case 1: a folder of the user's named like the run's own
@pytest.mark.parametrize("marker", [None, '{"mine": 1}\n'], ids=["no-marker", "another-run.json"])
def test_a_users_folder_named_like_the_runs_own_is_refused_untouched(tmp_path, marker):
    out = tmp_path / "d"
    (out / PRIVATE / "tmp").mkdir(parents=True)
    (out / PRIVATE / "tmp" / "keep.txt").write_text("p")
    (out / PRIVATE / "notes.txt").write_text("n")
    if marker is not None:
        (out / PRIVATE / "run.json").write_text(marker)
    before = tree(out)
    with pytest.raises(OutDirError, match=f"out_dir '{out}' holds a folder '{PRIVATE}' that no fastunlearn run wrote"):
        run(out)
    assert tree(out) == before


def test_an_empty_folder_named_like_the_runs_own_is_used_and_removed(tmp_path, reference):
    out = tmp_path / "d"
    (out / PRIVATE).mkdir(parents=True)  # nothing in it to lose: as an empty out_dir
    assert_same_run(run(out), reference)
    assert not (out / PRIVATE).exists()


# ---- case 2: a file of the user's inside an output folder, added before a resume
def test_a_users_file_in_merged_or_adapter_stays_on_resume(tmp_path, reference):
    out = interrupted(tmp_path / "run")
    for folder in ("merged", "adapter"):
        (out / folder / "notes").mkdir(parents=True)
        (out / folder / "my_readme.txt").write_text(f"mine, in {folder}")
        (out / folder / "notes" / "a.txt").write_text("mine too")
    assert_same_run(run(out), reference)
    for folder in ("merged", "adapter"):
        assert (out / folder / "my_readme.txt").read_text() == f"mine, in {folder}"
        assert (out / folder / "notes" / "a.txt").read_text() == "mine too"
        assert {p.name for p in (reference.out_dir / folder).iterdir()} <= {p.name for p in (out / folder).iterdir()}
    weights = "merged/model.safetensors"
    assert (out / weights).read_bytes() == (reference.out_dir / weights).read_bytes()


# ---- case 3: the same model by another path, or a copy
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_model("gpt_neo").save_pretrained(root / "model")
    shutil.copytree(root / "model", root / "copy")
    changed = tiny_model("gpt_neo")
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    changed.save_pretrained(root / "changed")
    return root


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_the_fingerprint_is_the_models_not_its_path(saved_models, monkeypatch):
    fingerprint = model_fingerprint(load(saved_models / "model"))
    monkeypatch.chdir(saved_models)
    assert model_fingerprint(load("model")) == fingerprint  # a relative path
    assert model_fingerprint(load(saved_models / "copy")) == fingerprint  # cp -r
    assert model_fingerprint(load(saved_models / "changed")) != fingerprint  # one weight changed


def test_a_copy_of_the_model_resumes_and_a_changed_one_is_refused(tmp_path, saved_models):
    out = interrupted(tmp_path / "run", model=load(saved_models / "model"))
    with pytest.raises(ValueError, match="holds a run of another model"):
        run(out, model=load(saved_models / "changed"))
    assert run(out, model=load(saved_models / "copy")).log["resumes"] == 1


def test_a_copy_of_the_model_hits_the_heldout_baseline_cache(tmp_path, saved_models):
    data = UnlearningData(token_set(2, 1), token_set(2, 2), token_set(2, 3))
    options = {"config": {"stop": "heldout", "ma_threshold": None, "el_threshold": None, "max_epochs": 1,
                          "min_epochs": 1}}  # fmt: skip
    first = run(tmp_path / "first", model=load(saved_models / "model"), data=data, **copy.deepcopy(options))
    again = run(tmp_path / "again", model=load(saved_models / "copy"), data=data, **copy.deepcopy(options))
    assert first.log["baseline_cache"]["hit"] is False and again.log["baseline_cache"]["hit"] is True


# ---- cases 4 and 5: a damaged checkpoint is named; never an older version instead
def version_folder(out: Path, version: int) -> Path:
    return out / PRIVATE / f"checkpoint-{version:06d}"


def test_a_lost_manifest_is_named_not_taken_for_no_checkpoint(tmp_path):
    out = interrupted(tmp_path / "run")
    (version,) = checkpoint.versions(out)
    manifest = version_folder(out, version) / "manifest.json"
    manifest.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file '{manifest}' is missing") as error:
        run(out)
    assert "damaged" in str(error.value) and "\n" not in str(error.value)


def test_a_lost_marker_is_named_not_taken_for_files_of_yours(tmp_path):
    out = interrupted(tmp_path / "run")
    marker = out / PRIVATE / "run.json"
    marker.unlink()
    before = tree(out)
    with pytest.raises(OutDirError, match=f"holds an interrupted run whose marker file '{marker}' is missing"):
        run(out)
    assert tree(out) == before


@pytest.fixture
def two_versions(tmp_path):
    """An interrupted run with an older complete version (1) beside the pointer's (the newest)."""
    out = interrupted(tmp_path / "run", epoch=2)
    (newest,) = checkpoint.versions(out)
    shutil.copytree(version_folder(out, newest), version_folder(out, 1))
    assert checkpoint.latest(out)[0] == newest
    return out, newest


@pytest.mark.parametrize("damage", ["manifest", "folder"])
def test_the_pointers_version_missing_is_refused_not_replaced_by_an_older_one(two_versions, damage):
    out, newest = two_versions
    folder = version_folder(out, newest)
    missing = folder / "manifest.json" if damage == "manifest" else folder
    missing.unlink() if damage == "manifest" else shutil.rmtree(folder)
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file '{missing}' is missing \\(the pointer"):
        run(out)


def test_without_a_pointer_a_damaged_newest_version_is_refused_not_an_older_one_taken(two_versions):
    out, newest = two_versions
    (out / PRIVATE / "checkpoint.json").unlink()
    state = version_folder(out, newest) / "state.json"
    state.write_text(state.read_text()[:-3])
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file '{state}' is corrupt"):
        run(out)


# ---- case 6: a finished run, rerun
def test_a_finished_run_rerun_is_reported_finished_and_left_as_it_is(tmp_path):
    result = run(tmp_path / "run")
    before = tree(result.out_dir)
    with pytest.raises(RunFinished, match="holds this run, already finished") as done:
        run(result.out_dir)
    assert done.value.log == result.log and tree(result.out_dir) == before
    with pytest.raises(OutDirError, match=r"holds a finished run with another config \(fields \['lr'\]\)"):
        run(result.out_dir, config={"lr": 5e-3})
    with pytest.raises(OutDirError, match="holds a finished run with another model"):
        run(result.out_dir, model=tiny_model("gpt_neo", seed=1))
    with pytest.raises(OutDirError, match="holds a finished run with another data"):
        run(result.out_dir, data=UnlearningData(token_set(2, 5), token_set(2, 2), None))


def test_a_run_killed_after_its_outputs_is_finished_and_its_remains_removed(tmp_path, monkeypatch):
    from fastunlearn.engine import outdir

    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # killed after the outputs and the checkpoint's removal, before the rest
        patch.setattr(outdir, "remove_private", lambda out: (_ for _ in ()).throw(Interrupt()))
        with pytest.raises(Interrupt):
            run(out)
    assert (out / PRIVATE / "run.json").is_file()
    with pytest.raises(RunFinished):
        run(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.json", "merged", "metrics.png", "report.md"]


def test_the_seq_len_beyond_the_models_positions_is_refused_before_any_compute(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # 32 positions
    long = SequenceSet(ids, torch.ones_like(ids), torch.arange(2))
    with pytest.raises(ValueError, match="forget set's rows \\(seq_len\\) is 40 tokens, longer than the model's 32"):
        run(tmp_path / "run", data=UnlearningData(long, token_set(2, 2), None))
    assert not (tmp_path / "run").exists()


def test_an_output_folder_is_updated_in_place_keeping_other_files(tmp_path):
    """The new files are renamed in one by one; the user's file is never moved, copied or removed."""
    from fastunlearn.utils.atomic import atomic_directory

    target = tmp_path / "merged"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "mine.txt").write_text("mine")
    with atomic_directory(target, keep=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new" and (target / "mine.txt").read_text() == "mine"
    assert sorted(os.listdir(target)) == ["config.json", "mine.txt"]
