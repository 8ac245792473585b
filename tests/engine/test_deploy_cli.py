"""`fastunlearn unlearn` with a .gguf --model writes OUT/merged.gguf unless --no-gguf; --deploy-quant and
--quant-aware reach the engine; flags that need a .gguf model without one exit 2 before anything loads."""

from __future__ import annotations

import json
import random

import pytest

from fastunlearn import cli, gguf_io
from fastunlearn.cli import unlearn as unlearn_cli
from fastunlearn.engine.config import DEPLOY_QUANTS
from fastunlearn.models import load_model
from tests.helpers.tiny_gguf import tiny_llama, write_template

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["hello", "world", "forget", "keep", "the", "quiet", "river", "stone", "light", "north"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-cli")
    write_template(tiny_llama(), root / "tiny.Q4.gguf")
    rng = random.Random(0)
    for name, n in (("forget", 4), ("retain", 8), ("heldout", 4)):
        (root / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)))
    return root


def argv(ws, out, *extra) -> list[str]:
    return ["unlearn", "--model", str(ws / "tiny.Q4.gguf"), "--forget", str(ws / "forget.txt"), "--retain",
            str(ws / "retain.txt"), "--heldout", str(ws / "heldout.txt"), "--params", "lora", "--rank", "2",
            "--max-epochs", "1", "--stop", "epochs", "--seq-len", "8", "--out", str(out), *extra]  # fmt: skip


def test_a_gguf_model_leaves_merged_gguf_and_the_deploy_options_reach_the_engine(ws, capsys):
    out = ws / "run"
    assert cli.main(argv(ws, out, "--deploy-quant", "gguf", "--quant-aware", "q8_0")) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["deploy_quant"] == "gguf" and log["config"]["quant_aware"] == "q8_0"
    assert log["config"]["gguf_template"] == str((ws / "tiny.Q4.gguf").resolve())
    assert log["outputs"]["gguf"] == "merged.gguf" and gguf_io.is_own_gguf(out / "merged.gguf")
    model, _ = load_model(ws / "tiny.Q4.gguf")
    assert set(log["deploy"]["weights"]) == set(gguf_io.formats_like(model, ws / "tiny.Q4.gguf").values()) - {"f32"}
    assert cli.main(argv(ws, ws / "no-gguf", "--no-gguf")) == 0
    assert not (ws / "no-gguf" / "merged.gguf").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--deploy-quant", "gguf"], "--deploy-quant gguf takes the tensor types of a .gguf --model"),
        (["--quant-aware", "gguf"], "--quant-aware gguf takes the tensor types of a .gguf --model"),
        (["--no-gguf"], "--no-gguf turns off merged.gguf, written only for a .gguf --model"),
    ],
)
def test_gguf_flags_without_a_gguf_model_exit_2_before_loading(ws, tmp_path, capsys, flags, message):
    args = argv(ws, tmp_path / "run", *flags)
    args[args.index("--model") + 1] = str(tmp_path / "not-loaded")  # never read: the flags are checked first
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_cli_lists_the_engines_formats(capsys):
    assert unlearn_cli.DEPLOY_QUANTS == DEPLOY_QUANTS
    with pytest.raises(SystemExit) as exit_:
        cli.main(["unlearn", "--model", "m", "--forget", "f", "--out", "o", "--deploy-quant", "q3"])
    assert exit_.value.code == 2 and "invalid choice: 'q3'" in capsys.readouterr().err
