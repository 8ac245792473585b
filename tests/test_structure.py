"""Package structure: import layering (parsed with ast), a light ``import fastunlearn``, extras that say so."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower levels never import higher ones: cli -> engine -> building blocks -> ops -> kernels / csrc.
LEVELS = {
    "kernels": 0,
    "ops": 1,  # losses, dispatch, checks, low-rank, targets, process groups
    "blocks": 2,  # LoRA, FILA, Fisher, metrics, data, export, report, fused LM patch
    "engine": 3,
    "top": 4,  # cli, demo, integrations
}
OPS = {
    "_validate", "_dispatch", "_optional", "_atomic", "_ihl_torch", "_fisher_torch", "_C", "ihl", "fused_linear",
    "objectives", "targets", "distributed", "lowrank", "logprob", "_logprob_torch",
}  # fmt: skip
TOP = {
    "cli", "cli_data", "cli_finetune", "cli_info", "cli_tofu", "__main__", "demo", "demo_cache", "demo_real",
    "integrations",
}  # fmt: skip


def level(module: str) -> int:
    """Level of a module given as its dotted path below ``fastunlearn`` ("" is the package itself)."""
    head = module.split(".")[0]
    if head == "kernels":
        return LEVELS["kernels"]
    if head in OPS:
        return LEVELS["ops"]
    if head == "engine":
        return LEVELS["engine"]
    if head in TOP or head == "":
        return LEVELS["top"]
    return LEVELS["blocks"]


def package_modules() -> dict[str, Path]:
    """dotted name below fastunlearn -> file, for fastunlearn/ and kernels/ (installed as fastunlearn.kernels)."""
    found = {}
    for base, prefix in ((ROOT / "fastunlearn", ""), (ROOT / "kernels", "kernels.")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[prefix + ".".join(parts)] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """Dotted names below fastunlearn that ``module`` imports (absolute or relative), at any depth in the file."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if module else []
    package = here if is_package else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolved against this module's package
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            out.update([base] if node.module else [f"{base}.{alias.name}".strip(".") for alias in node.names])
            continue
        if isinstance(node, ast.Import):
            absolute = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            absolute = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name.removeprefix("fastunlearn.") for name in absolute if name.startswith("fastunlearn."))
    return out


def test_lower_layers_never_import_higher_ones():
    modules = package_modules()
    assert {"ihl", "engine.recipe", "cli", "kernels.ihl", "metrics.extraction"} <= set(modules)
    violations = []
    for module, path in sorted(modules.items()):
        if module == "":  # fastunlearn/__init__.py exports from every level (the engine lazily)
            continue
        for target in imported(module, path):
            if level(target) > level(module):
                violations.append(f"{module} (level {level(module)}) imports {target} (level {level(target)})")
    assert not violations, "\n".join(violations)


def test_modules_below_the_engine_never_import_engine_cli_or_integrations():
    modules = package_modules()
    for module, path in modules.items():
        if level(module) < LEVELS["engine"]:
            bad = {t for t in imported(module, path) if t.split(".")[0] in ("engine", "cli", "integrations")}
            assert not bad, f"{module} imports {bad}"


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_fastunlearn_loads_no_optional_dependency():
    out = run_python(
        "import sys, fastunlearn\n"
        "heavy = [m for m in ('transformers', 'datasets', 'matplotlib', 'triton', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(fastunlearn.unlearn) and 'transformers' in sys.modules\n"  # the engine, on first use
        "print('ok')\n"
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize(
    "module, extra",
    [("fastunlearn.metrics", "engine"), ("fastunlearn.fused_lm", "engine"), ("fastunlearn.integrations.hf", "hf")],
)
def test_a_missing_extra_is_named(module, extra):
    """Without transformers the core still works, and the modules that need it say which extra to install."""
    out = run_python(
        "import sys\n"
        "sys.modules['transformers'] = None  # import transformers -> ImportError\n"
        "import torch, fastunlearn\n"
        "fastunlearn.ihl_loss(torch.randn(2, 5), torch.tensor([0, 1]))\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert out.returncode == 0, out.stderr
    assert f'pip install "fastunlearn[{extra}]"' in out.stdout and "'transformers'" in out.stdout, out.stdout
