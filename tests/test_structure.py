"""Package structure: import layering (parsed with ast), a light ``import fastunlearn``, extras that say so; the
tests' layout mirrors the package and no test file imports another."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
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


# ---------------------------------------------------------------------------------------------------------
# The tests mirror the package; test files share code only through tests/helpers and tests/conftest.py
# ---------------------------------------------------------------------------------------------------------
WHOLE_PACKAGE_TESTS = {"test_structure.py", "test_install.py", "test_readme.py"}  # the package as a whole
SHARED_FOLDERS = {"helpers"}  # the one folder of tests/ that mirrors no package folder: what test files share
SHARED_FILES = {"__init__.py", "conftest.py"}


def misplaced_tests(tests: Path, package: Path, extra_folders: set[str]) -> list[str]:
    """tests/<folder> must test package/<folder> (or be helpers/, or one of ``extra_folders``) and be a package;
    tests/test_<module>.py a top-level module package/<module>.py, or the package as a whole."""
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()} | extra_folders
    modules = {p.stem for p in package.glob("*.py") if not p.name.startswith("_")}
    wrong = []
    for path in sorted(tests.iterdir()):
        name = path.name
        if name.startswith(".") or name == "__pycache__":
            continue
        if path.is_dir() and name not in folders | SHARED_FOLDERS:
            wrong.append(f"tests/{name}/: no package folder {package.name}/{name}/ (allowed: {sorted(folders)})")
        elif path.is_dir() and not (path / "__init__.py").is_file():
            wrong.append(f"tests/{name}/ has no __init__.py (its modules' names would clash with other folders')")
        elif path.is_file() and path.suffix == ".py" and name not in SHARED_FILES | WHOLE_PACKAGE_TESTS:
            if not name.startswith("test_"):
                wrong.append(f"tests/{name}: code the tests share belongs in tests/helpers/")
            elif name[5:-3] not in modules:
                wrong.append(f"tests/{name}: no top-level module {package.name}/{name[5:]}; move it into its folder")
    return wrong


def test_every_tests_folder_is_a_package_folder_or_helpers():
    assert misplaced_tests(ROOT / "tests", ROOT / "fastunlearn", {"kernels"}) == []


def test_the_folder_rule_reports_misplaced_tests(tmp_path):
    package, tests = tmp_path / "pkg", tmp_path / "tests"
    for folder in (package / "ops", tests / "ops", tests / "helpers", tests / "misc", tests / "lora"):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    (tests / "lora" / "__init__.py").unlink()
    for name in ("losses.py", "_private.py"):
        (package / name).write_text("")
    for name in ("test_losses.py", "test_private.py", "test_readme.py", "tiny.py", "conftest.py"):
        (tests / name).write_text("")
    found = "\n".join(misplaced_tests(tests, package, set()))
    assert [line.split(":")[0].split(" ")[0] for line in found.splitlines()] == [
        "tests/lora/", "tests/misc/", "tests/test_private.py", "tests/tiny.py"
    ], found  # fmt: skip


def module_names_in_tests() -> set[str]:
    """Bare names of every module under tests/ (test files, conftest, helpers)."""
    return {p.stem for p in (ROOT / "tests").rglob("*.py")} - {"__init__"}


def bad_imports(source: str, bare: set[str], strings: bool = True) -> list[str]:
    """Imports of a test file, conftest or a tests/ module by its bare name, relative imports and sys.path
    changes in ``source``, and with ``strings`` in code it holds in strings (what it runs in a subprocess)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:
                found += bad_imports(textwrap.dedent(node.value), bare)
            except SyntaxError:
                pass
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.ImportFrom) and node.level:
                found.append(f"line {node.lineno}: relative import (use tests.helpers.<module>)")
                continue
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                head = name.split(".")[0]
                if head == "tests" and not name.startswith("tests.helpers") and name != "tests":
                    found.append(f"line {node.lineno}: imports {name} (only tests.helpers is shared)")
                    break
                if head in bare:
                    found.append(f"line {node.lineno}: imports {name} by its bare name (use tests.helpers)")
                    break
        elif (isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
              and ast.unparse(node.value) == "sys.path"):  # fmt: skip
            found.append(f"line {node.lineno}: changes sys.path")
    return found


def test_no_test_file_imports_another_test_file():
    """Test files share code through tests/helpers (imported as tests.helpers.<module>) and fixtures through
    tests/conftest.py, never by importing another test file or conftest, so each folder runs on its own."""
    bare = module_names_in_tests()
    assert {"test_ihl", "conftest", "tiny_models"} <= bare
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        strings = path != Path(__file__).resolve()  # this file's strings are the rule's own bad examples
        found += [f"{path.relative_to(ROOT)}: {line}" for line in bad_imports(path.read_text(), bare, strings)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from tests.engine.test_unlearn import memorized",
        "from tests.cli import test_cli_unlearn",
        "import tests.conftest",
        "from tests import conftest",
        "from conftest import IMPL_PARAMS",
        "from tiny_models import tiny_model",
        "def f():\n    import test_qa",
        "from .test_qa import WORDS",
        "import sys\nsys.path.insert(0, 'tests')",
        'WORKER = """\n    import os\n    from test_hf_trainer import SGD\n"""',
    ],
    ids=[
        "test-file",
        "test-module",
        "conftest",
        "from-tests-conftest",
        "bare-conftest",
        "bare-helper",
        "nested",
        "relative",
        "sys-path",
        "subprocess-code",
    ],
)
def test_the_import_rule_reports_each_way_of_importing_a_test_file(source):
    assert bad_imports(source, {"test_qa", "test_hf_trainer", "conftest", "tiny_models"}), source
    assert not bad_imports("from tests.helpers.tiny_models import tiny_model\nimport tests.helpers.runs", set())
