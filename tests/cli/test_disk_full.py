"""A full disk, whichever library's write finds it (os.write, safetensors, json): exit 3 with one line naming the
output and saying that the same command resumes; after space is freed the same command ends bit-equal to a run
that never failed. ``eval --json`` onto a full disk leaves the file as it was.

The disk fills for real in a child process with a file size limit (``tests.helpers.faults``) at several sizes:
inside the first checkpoint, a later checkpoint (with the optimizer state) and the merged model's export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastunlearn import cli
from fastunlearn.engine.checkpoint import has_checkpoint
from tests.helpers.faults import error_lines, run_with_file_limit

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = {"--params": "lora", "--rank": "2", "--max-epochs": "2", "--min-epochs": "2", "--seq-len": "12",
         "--no-baseline-cache": True}  # fmt: skip
OUTPUTS = ("adapter/adapter_model.safetensors", "merged/model.safetensors")


def unlearn_argv(ws, out: Path) -> list[str]:
    args = {"--model": ws / "model", "--forget": ws / "forget.txt", "--retain": ws / "retain.txt",
            "--heldout": ws / "heldout.txt", **FLAGS, "--out": out}  # fmt: skip
    return ["unlearn", *[str(x) for kv in args.items() for x in kv if x is not True]]


def epochs(log: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if not k.endswith("_s")} for t in log["tasks"] for e in t["epochs"]]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run (in this process, one thread, as the child) and the size of each checkpoint state it
    wrote (the setup's, then each epoch's, with the optimizer's moments)."""
    from fastunlearn.engine import checkpoint

    out, sizes = tmp_path_factory.mktemp("reference") / "run", []

    def save_file(tensors, path):
        save(tensors, path)
        sizes.append(Path(path).stat().st_size)

    save = checkpoint.save_file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_file", save_file)
        assert cli.main(unlearn_argv(workspace, out)) in (0, 1)
    return out, sizes


@pytest.mark.parametrize("where", ["first-checkpoint", "epoch-checkpoint", "export"])
def test_a_full_disk_names_the_output_and_the_same_command_resumes_bit_equal(workspace, tmp_path, reference, where):
    reference, (setup, epoch, _) = reference
    merged = (reference / OUTPUTS[1]).stat().st_size
    assert setup < epoch < merged  # each limit below makes another write fail
    limit = {"first-checkpoint": setup - 1, "epoch-checkpoint": epoch - 1, "export": merged - 1}[where]
    out = tmp_path / "run"
    failed = run_with_file_limit(unlearn_argv(workspace, out), limit)
    assert failed.returncode == 3, failed.stderr
    (line,) = error_lines(failed.stderr)
    assert line.startswith("fastunlearn unlearn: failed: File too large writing " + str(out)), line
    assert "the same command resumes" in line and "Traceback" not in failed.stderr
    assert has_checkpoint(out) == (where != "first-checkpoint")
    assert cli.main(unlearn_argv(workspace, out)) in (0, 1)  # space freed: the same command
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    log, expected = (json.loads((d / "log.json").read_text()) for d in (out, reference))
    assert epochs(log) == epochs(expected) and log["resumes"] == (0 if where == "first-checkpoint" else 1)


def test_a_safetensors_error_on_a_full_disk_is_the_documented_line(workspace, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from fastunlearn.engine import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(workspace, out)) == 3
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"fastunlearn unlearn: failed: No space left on device writing {out} (free space, then "
                           "the same command resumes"), line  # fmt: skip


def test_eval_json_onto_a_full_disk_leaves_the_file_as_it_was(workspace, tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"earlier": 1}\n')
    argv = ["eval", "--model", workspace / "model", "--set", f"f={workspace / 'forget.txt'}", "--seq-len", "12",
            "--json", target]  # fmt: skip
    failed = run_with_file_limit(argv, 40)  # the results (~70 bytes) do not fit
    assert failed.returncode == 3, failed.stderr
    (line,) = error_lines(failed.stderr)
    assert f"File too large writing {target}" in line and "run the same command again" in line, line
    assert target.read_text() == '{"earlier": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
