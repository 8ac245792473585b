"""Old import paths of moved modules keep working: ``import fastunlearn.metrics`` is ``fastunlearn.evals.metrics``.

``MOVED`` is the one table of them (old name below ``fastunlearn`` -> new). A finder on ``sys.meta_path`` answers
an old name, or any module below it, with the module at its new place, the same object: attributes set on one are
seen through the other, and ``sys.modules`` holds both names. Only modules that users were shown are listed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "distributed": "utils.distributed",
    "ihl": "ops.ihl",
    "fused_linear": "ops.fused_linear",
    "logprob": "ops.logprob",
    "lowrank": "ops.lowrank",
    "objectives": "losses",
    "targets": "lora.targets",
    "fisher": "lora.fisher",
    "fila": "lora.fila",
    "export": "lora.export",
    "qa": "data.qa",
    "metrics": "evals.metrics",
    "tofu": "evals.tofu",
    "downstream": "evals.downstream",
    "report": "engine.report",
}


def new_name(fullname: str) -> str | None:
    """``fastunlearn.<old>[.sub]`` -> ``fastunlearn.<new>[.sub]``, or None when the name did not move."""
    head, _, rest = fullname.partition(".")
    if head != "fastunlearn" or not rest:
        return None
    for old, new in MOVED.items():
        if rest == old or rest.startswith(old + "."):
            return f"fastunlearn.{new}{rest[len(old) :]}"
    return None


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new name, leaving that module's own spec in place."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # the import system sets __spec__ to the old name's spec next: undone below
        return module

    def exec_module(self, module) -> None:  # executed under its new name already
        module.__spec__ = self.spec


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new), is_package=True)


def install() -> None:
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # first: the path finder would load a second copy of the file
