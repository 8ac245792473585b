"""The command line and the offline demo (the README's main command)."""

from __future__ import annotations

import copy

import pytest

from fastunlearn import cli
from fastunlearn.demo import DemoConfig, memorize, unlearn


def test_info_reports_the_paths(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "IHL on cpu tensors runs:" in out and "C++ extension" in out


def test_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["forget-everything"])
    assert exc.value.code == 2


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
        DemoConfig(seq_len=1)
    with pytest.raises(ValueError, match="lr_unlearn must be > 0"):
        DemoConfig(lr_unlearn=0.0)


def test_demo_memorizes_then_ihl_forgets_and_keeps_the_retain_set():
    cfg = DemoConfig()
    model, sets = memorize(cfg)
    ihl = unlearn(copy.deepcopy(model), sets, cfg, "ihl")
    assert ihl["before"]["forget"] >= 0.95 and ihl["before"]["retain"] >= 0.95  # memorized
    assert ihl["after"]["forget"] <= ihl["before"]["heldout"]  # the paper's criterion
    assert ihl["after"]["retain"] >= 0.95  # utility kept
    assert all(0.0 <= v <= 2.0 for v in ihl["forget_loss_history"])  # IHL is bounded
    ga = unlearn(copy.deepcopy(model), sets, cfg, "ga")
    assert min(ga["forget_loss_history"]) < -2.0  # GA's loss is not
