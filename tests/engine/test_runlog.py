"""The run log as typed records (``fastunlearn.engine.runlog``): ``to_dict`` is exactly the ``log.json`` the engine
has always written (keys, their order, nesting, value types), ``from_dict`` reads such a log back, and a checkpoint
whose log an earlier version wrote resumes. tests/data/runlog/ holds logs written before the records existed:
``interrupted-*.json`` (a checkpoint's log after epoch 1), ``finished-hook.json`` and ``resumed-continual.json``
(the log.json of a finished run, the latter resumed from ``interrupted-continual.json``'s checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, checkpoint, unlearn
from fastunlearn.engine.inputs import data_fingerprint
from fastunlearn.engine.runlog import EpochRecord, RunLog, TaskLog
from fastunlearn.utils.atomic import PRIVATE
from tests.helpers.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

OLD_LOGS = Path(__file__).resolve().parents[1] / "data" / "runlog"
# The runs of the logs in OLD_LOGS: a continual LoRA run (two tasks) and a FILA run with every optional part.
CONTINUAL = {
    "params": "lora",
    "rank": 2,
    "alpha": 4.0,
    "lr": 1e-2,
    "el_n": 3,
    "micro_batch_size": 2,
    "min_epochs": 2,
    "max_epochs": 2,
    "stop": "threshold",
    "ma_threshold": 0.0,
    "el_threshold": 0.0,
    "retain_weight": 0.0,
}
WITH_HOOK = {"params": "fila", "rank": 2, "alpha": 4.0, "lr": 1e-2, "el_n": 3, "micro_batch_size": 2, "min_epochs": 1,
             "max_epochs": 2, "stop": "heldout", "eval_retain_ppl": True, "eval_heldout_el_after": True,
             "cache_heldout_baseline": False, "eval_every": 1}  # fmt: skip
# eval_every=1: perplexities every epoch, as the logs of tests/data/runlog were written (the default, 0, writes
# null in the epoch records instead: the same keys and types)


def token_set(n: int, seed: int, pad: bool = False) -> SequenceSet:
    ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, 5:] = 0
    return SequenceSet(ids, mask, torch.arange(n))


def hook(model, epoch: int) -> dict:
    return {"const": 1.5, "epoch": float(epoch), "nan": float("nan")}


def with_hook_data() -> UnlearningData:
    return UnlearningData(token_set(4, 1), token_set(4, 2), token_set(4, 3), utility={"wiki": token_set(3, 4, True)})


def old_log(name: str) -> dict:
    return json.loads((OLD_LOGS / name).read_text())


def shape(value):
    """Keys (in order), nesting and value types; a list as the distinct shapes of its items. A float and None count
    alike, and lists of any length: whether a metric was measured (EL once MA meets its limit) and the epoch a
    criterion is met may differ between machines, what the log holds may not."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return ["list", sorted({repr(shape(item)) for item in value})]
    return "float or None" if value is None or type(value) is float else type(value).__name__


def log_shape(log: dict):
    """``shape`` of a whole log, the config as its earlier fields in order: a field added to ``UnlearnConfig``
    since the log was written (``batch_size``) is written too, and nothing an earlier version wrote may go; the
    model's record likewise (``fingerprint`` added since: a rerun of a finished run recognizes it)."""
    earlier = old_log("finished-hook.json")
    old_fields = list(earlier["config"])
    config = [key for key in log["config"] if key in old_fields]
    assert config == old_fields, f"config fields missing or reordered: {set(old_fields) - set(config)}"
    model = {key: item for key, item in log["model"].items() if key in earlier["model"]}
    assert list(model) == list(earlier["model"]), f"model fields missing or reordered: {list(model)}"
    replaced = {"config": config, "model": model}
    return shape({key: replaced.get(key, item) for key, item in log.items()})


def same_json(a: dict, b: dict) -> bool:
    return json.dumps(a) == json.dumps(b)  # order included


@pytest.mark.parametrize("name", ["interrupted-continual.json", "interrupted-hook.json", "finished-hook.json",
                                  "resumed-continual.json"])  # fmt: skip
def test_logs_written_before_the_records_read_back_unchanged(name):
    log = RunLog.from_dict(old_log(name))
    assert isinstance(log.tasks[0], TaskLog) and all(isinstance(e, EpochRecord) for e in log.tasks[0].epochs)
    assert same_json(log.to_dict(), old_log(name))


def test_a_run_writes_the_shape_of_earlier_versions_and_reads_it_back(tmp_path):
    result = unlearn(tiny_model("gpt_neo"), with_hook_data(), UnlearnConfig(**WITH_HOOK), tmp_path / "run",
                     evaluate_each_epoch=hook)  # fmt: skip
    written = json.loads((tmp_path / "run" / "log.json").read_text())
    assert isinstance(result.log, dict) and same_json(result.log, written)
    assert log_shape(written) == log_shape(old_log("finished-hook.json"))
    assert same_json(RunLog.from_dict(written).to_dict(), written)
    assert written["baseline"]["on_epoch"] == {"const": 1.5, "epoch": 0.0, "nan": None}


def test_optional_keys_are_written_only_with_a_value():
    record = EpochRecord(1, forget_loss=0.5, updated=True)
    assert "on_epoch" not in record.to_dict() and list(record.to_dict())[:3] == ["epoch", "forget_loss", "retain_loss"]
    record.on_epoch = {}
    assert record.to_dict()["on_epoch"] == {}
    with pytest.raises(KeyError, match="unknown keys"):
        EpochRecord.from_dict({**record.to_dict(), "extra": 1})
    with pytest.raises(KeyError, match="no 'epoch'"):
        EpochRecord.from_dict({})


def test_a_checkpoint_holding_an_earlier_versions_log_resumes(tmp_path):
    """The interrupted run's checkpoint, its log replaced by the one an earlier version wrote at the same point;
    the resumed run keeps that log's first epoch, finishes, and writes the shape that version wrote."""
    tasks = [token_set(2, 5), token_set(2, 6)]
    config, out = UnlearnConfig(**CONTINUAL), tmp_path / "run"

    def interrupt(task: int, record: dict) -> None:
        if (task, record["epoch"]) == (0, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(tiny_model("gpt_neo"), tasks, config, out, on_epoch_end=interrupt)
    old = old_log("interrupted-continual.json")
    old["config"] = config.to_dict()  # the log's shape is under test, not the config fields added since
    old["data"]["fingerprint"] = data_fingerprint(tasks, None, None, None)
    version, _ = checkpoint.latest(out)
    folder = out / PRIVATE / f"checkpoint-{version:06d}"
    (folder / "state.json").write_text(json.dumps({"format": checkpoint.FORMAT, "log": old}))
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"]["state.json"] = checkpoint.digest(folder / "state.json")
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))

    result = unlearn(tiny_model("gpt_neo"), tasks, config, out)
    assert result.log["status"] == "finished" and result.log["resumes"] == 1
    assert result.log["tasks"][0]["epochs"][0] == old["tasks"][0]["epochs"][0]  # carried over as it was
    assert log_shape(result.log) == log_shape(old_log("resumed-continual.json"))
    assert [len(t["epochs"]) for t in result.log["tasks"]] == [2, 2]
