"""Every ```python block of README.md and docs/*.md runs as written, on a tiny model, in a temporary working
directory; every relative link of those files resolves, and docs/cli.md names every option of every subcommand.

Each block gets a fresh namespace holding only the user's own objects that the README assumes (``model``,
``tokenizer``, ``forget_ids``, ``data``, ``path``, ...); every library name must be imported by the block
itself. ``forget.csv``, ``heldout.csv`` and ``wikitext.txt`` (text), ``forget.json``, ``retain.json`` and
``heldout.json`` (question/answer pairs) are written to the working directory. Only what
cannot run here is replaced: ``init_from_env`` returns the CPU (no torchrun), and the Hub is off. A block that
cannot run here at all must be listed in ``NOT_RUN`` with the reason, so a new or broken block fails.
"""

from __future__ import annotations

import csv
import inspect
import json
import random
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the user's guide and the reference it links to


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


BLOCKS = [(path.relative_to(ROOT).as_posix(), block) for path in DOCS for block in python_blocks(path)]
NOT_RUN: dict[str, str] = {  # first line of a block -> why it cannot run in the tests
    "from fastunlearn.evals.downstream import evaluate_downstream": "lm-eval downloads the task's data from the hub",
}
WORDS = [f"w{i}" for i in range(60)]
SEQ_LEN = 12


def _tokenizer():
    from tests.helpers.tiny_models import word_tokenizer

    return word_tokenizer(WORDS)


def _model():
    """A 2-layer GPT-Neo over the tokenizer's 63 tokens; 256 positions, as the README's seq_len=200 needs."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=64, max_position_embeddings=256, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global"], 2]], window_size=256, intermediate_size=64, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return GPTNeoForCausalLM(config).eval()


def _line(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    """The README's assumed objects, and its files in the working directory."""
    from fastunlearn.data.text import UnlearningData, tokenize_sequences
    from fastunlearn.utils import distributed

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: torch.device("cpu"))
    rng = random.Random(0)
    texts = {name: [_line(rng, 20) for _ in range(n)] for name, n in (("forget", 4), ("heldout", 4))}
    for name, rows in texts.items():
        with open(f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["text"], *[[row] for row in rows]])
    Path("wikitext.txt").write_text("\n".join(_line(rng, 40) for _ in range(16)) + "\n")  # 640 words: 3 blocks
    for name, n in (("forget", 4), ("retain", 6), ("heldout", 4)):  # question/answer pairs (docs/engine.md)
        pairs = [{"question": _line(rng, 5), "answer": _line(rng, 4)} for _ in range(n)]
        Path(f"{name}.json").write_text(json.dumps(pairs))
    tokenizer, model = _tokenizer(), _model()
    model.save_pretrained(tmp_path / "saved-model")
    tokenizer.save_pretrained(tmp_path / "saved-model")
    data = UnlearningData(
        tokenize_sequences(texts["forget"], tokenizer, seq_len=SEQ_LEN, role="forget set"),
        tokenize_sequences(Path("wikitext.txt").read_text().split("\n")[:-1], tokenizer, seq_len=SEQ_LEN,
                           mode="pack", role="retain set"),
        tokenize_sequences(texts["heldout"], tokenizer, seq_len=SEQ_LEN, role="held-out set"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    n_rows = 6  # logits / hidden rows for the loss examples
    batches = {
        name: [{"input_ids": s.input_ids[i : i + 2], "attention_mask": s.attention_mask[i : i + 2]} for i in (0, 2)]
        for name, s in (("forget", data.forget), ("retain", data.retain))
    }
    return {
        "model": model,
        "tokenizer": tokenizer,
        "forget_ids": data.forget.input_ids,
        "mask": data.forget.attention_mask,
        "retain_ids": data.retain.input_ids[:4],
        "logits": torch.randn(n_rows, 64, generator=g, requires_grad=True),
        "labels": torch.randint(0, 64, (n_rows,), generator=g),
        "hidden": torch.randn(n_rows, 32, generator=g, requires_grad=True),
        "data": data,
        "forget_batches": batches["forget"],
        "retain_batches": batches["retain"],
        "path": str(tmp_path / "saved-model"),
        "D": str(_tofu_dir(tmp_path / "tofu", rng)),  # TOFU's file layout, tiny
        "target_model": _model(),
        "retain_model": _model(),
    }


def _tofu_dir(root: Path, rng: random.Random) -> Path:
    """TOFU's four evaluation files (forget01 and the three utility sets) with 3 questions each."""
    root.mkdir()
    for file in ("forget01", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        rows = [{"question": _line(rng, 5), "answer": _line(rng, 6), "paraphrased_answer": _line(rng, 6),
                 "perturbed_answer": [_line(rng, 6) for _ in range(3)]} for _ in range(3)]  # fmt: skip
        (root / f"{file}.json").write_text(json.dumps(rows))
    return root


def test_readme_has_the_python_blocks_this_file_expects():
    assert len(python_blocks(README)) >= 2, "README.md lost python blocks (or this test's pattern no longer finds them)"
    guides = {name for name, _ in BLOCKS if name.startswith("docs/")}
    assert {"docs/engine.md", "docs/scale-out.md", "docs/tofu.md"} <= guides, f"docs with python blocks: {guides}"
    first_lines = {block.splitlines()[0] for _, block in BLOCKS}
    stale = set(NOT_RUN) - first_lines
    assert not stale, f"NOT_RUN lists blocks that are no longer in README.md or docs/: {stale}"


def _block_id(name: str, block: str) -> str:
    index = [b for n, b in BLOCKS if n == name].index(block)
    return f"{Path(name).stem}-block{index}"


@pytest.mark.parametrize("name, block", BLOCKS, ids=[_block_id(name, block) for name, block in BLOCKS])
def test_readme_python_block_runs(name, block, namespace):
    if block.splitlines()[0] in NOT_RUN:
        pytest.skip(NOT_RUN[block.splitlines()[0]])
    exec(compile(block, f"{name} python block", "exec"), namespace)


def test_relative_links_resolve():
    """Every relative link of README.md, docs/ and the results' READMEs names a file or folder of the repository."""
    pages = [*DOCS, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "benchmarks").rglob("README.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to nothing: {broken}"


def test_cli_reference_names_every_option():
    """docs/cli.md has a section per subcommand naming each of its options (a new flag must be documented)."""
    import argparse

    from fastunlearn.cli.app import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## `fastunlearn (\w+)`\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(sections) == set(commands), f"docs/cli.md sections {sorted(sections)} vs commands {sorted(commands)}"
    missing = [f"{name} {option}" for name, parser in commands.items() for action in parser._actions
               for option in action.option_strings
               if option.startswith("--") and option != "--help"
               and not re.search(f"`{re.escape(option)}[` ]", sections[name])]  # fmt: skip
    assert not missing, f"options docs/cli.md does not name: {missing}"


def test_unlearn_imported_from_the_package_is_the_function():
    from fastunlearn import UnlearnConfig, unlearn
    from fastunlearn.engine import recipe

    assert inspect.isfunction(unlearn) and unlearn is recipe.unlearn
    assert UnlearnConfig().params == "fila"


def api_table_names(text: str) -> list[tuple[str, str]]:
    """(module, attribute) for every name in the first column of the README's API table, as it is written there:
    a row that starts with `fastunlearn.<module>` names attributes of that module (and other modules, written as
    dotted paths, that must import); every other row names attributes of ``fastunlearn`` itself."""
    section = text.split("\n## API", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.M):
        cells = re.findall(r"`([^`]+)`", row)
        if not cells or set(row) <= {"-", " ", "|"}:
            continue
        module = cells[0][len("fastunlearn.") :] if cells[0].startswith("fastunlearn.") else ""
        for cell in cells[1:] if module else cells:
            name = re.match(r"[\w.]+", cell).group(0)
            if "." in name:  # another module path the row names, e.g. (also `integrations.patch`)
                names.append((name, ""))
            else:
                names.append((module, name))
    return names


def test_every_name_of_the_api_table_works_as_written():
    import importlib

    names = api_table_names(README.read_text())
    assert ("", "ihl_loss") in names and ("", "fused_linear_logprob") in names
    assert ("evals.metrics", "perplexity") in names
    broken = []
    for module, attribute in names:
        try:
            owner = importlib.import_module(f"fastunlearn.{module}".rstrip("."))
            if attribute and not hasattr(owner, attribute):
                broken.append(f"fastunlearn.{module}.{attribute}".replace("..", "."))
        except ImportError as exc:
            broken.append(f"fastunlearn.{module} ({exc})")
    assert not broken, f"README API names that do not exist as written: {broken}"
