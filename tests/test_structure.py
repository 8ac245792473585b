"""Package structure: import layering (parsed with ast), a light ``import fastunlearn``, extras that say so."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers, lowest first: a module's layer is its folder (or, at the package's top, its file). A module may
# import its own layer and the ones below it, never one above.
LAYERS = (
    ("kernels", "_C"),  # Triton kernels (kernels/, installed as fastunlearn.kernels) and the C++ extension
    ("utils",),  # checks, atomic files, optional dependencies, process groups, moved import paths
    ("ops",),  # IHL, fused linear IHL, log-prob, Fisher accumulation, low-rank; dispatch; reference backends
    ("data",),  # texts, QA pairs and the next-token target rule
    ("losses",),  # the unlearning objectives built from the ops
    ("lora",),  # LoRA layers, targets, the model's Fisher, FILA, export
    ("models", "fused_lm", "gguf_io"),  # loading a model; fused IHL / log-prob patched into HF models; GGUF output
    ("evals",),  # TDEC metrics, TOFU, downstream tasks
    ("engine",),  # the unlearning and fine-tuning recipes
    ("integrations",),  # Hugging Face Trainer drop-ins, the public patch
    ("demo",),  # the demos
    ("cli", "__main__"),  # the command line
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
# Imports that point up, allowed only inside a function (run on the call, never when the module is imported): a
# documented entry point kept at its old place. module -> the modules it imports so.
CALL_TIME_IMPORTS = {"models": {"demo.smollm2"}}  # models.real_model(): SmolLM2's download lives in the demo layer


def level(module: str) -> int:
    """Layer of a module given as its dotted path below ``fastunlearn``: its first component names it."""
    head = module.split(".")[0]
    assert head in LEVEL, f"fastunlearn.{module} is in no layer: add its folder to LAYERS"
    return LEVEL[head]


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


def module_graph() -> dict[str, set[str]]:
    """module -> the modules of the package it imports (a name imported from a package resolves to its submodule
    when there is one, else to the package)."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target in imported(module, path):
            if target == "_C":  # the compiled extension: no source file
                targets.add(target)
                continue
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target != module:
                targets.add(target)
        graph[module] = targets - CALL_TIME_IMPORTS.get(module, set())
    return graph


def module_level_imports(path: Path) -> set[str]:
    """Dotted names below fastunlearn that a file imports outside any function (when it is imported)."""
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastunlearn."):
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return {name.removeprefix("fastunlearn.") for name in names}


def test_call_time_imports_stay_inside_functions():
    modules = package_modules()
    for module, targets in CALL_TIME_IMPORTS.items():
        assert targets <= imported(module, modules[module]), f"{module} no longer imports {targets}: drop the entry"
        early = {name for name in module_level_imports(modules[module]) if name.rpartition(".")[0] in targets
                 or name in targets}  # fmt: skip
        assert not early, f"{module} imports {sorted(early)} when it is imported, not only on a call"


def test_lower_layers_never_import_higher_ones():
    modules = package_modules()
    assert {"ops.ihl", "engine.recipe", "cli.app", "kernels.ihl", "evals.metrics.extraction"} <= set(modules)
    violations = []
    for module, targets in sorted(module_graph().items()):
        if module == "":  # fastunlearn/__init__.py exports from every level (the engine lazily)
            continue
        for target in sorted(targets - {""}):
            if level(target) > level(module):
                violations.append(f"{module} (layer {level(module)}) imports {target} (layer {level(target)})")
        if "" in targets and module.split(".")[0] not in ("cli", "engine"):  # the package root: __version__
            violations.append(f"{module} imports from the package root")
    assert not violations, "\n".join(violations)


def test_no_import_circles():
    """No module reaches itself through its imports (a package's __init__ re-exporting its own submodules
    counts only as the package importing them)."""
    graph = module_graph()
    for module in graph:  # a package is its __init__: it may import its children, they may not import it
        graph[module] = {t for t in graph[module] if not (module and t.startswith(module + "."))}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_no_module_imports_another_modules_private_name():
    """``from x import _name`` and ``x._name`` across modules: a private name stays in its module (tests aside)."""
    modules = package_modules()
    found = []
    for module, path in sorted(modules.items()):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastunlearn")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and alias.name != "_C":
                        found.append(f"{module}: from {node.module} import {alias.name}")
                    aliases.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                found.append(f"{module}: {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


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
    [
        ("fastunlearn.evals.metrics", "engine"),
        ("fastunlearn.fused_lm", "engine"),
        ("fastunlearn.integrations.hf", "hf"),
    ],
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
