"""Test setup and the fixtures test files share. TRITON_INTERPRET must be set before any @triton.jit decoration
runs, so it is set here, before anything imports fastunlearn.kernels: CPU tensors then run the real Triton kernels.
Plain helpers (models, references, settings) are in tests/helpers."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastunlearn.data.text import UnlearningData  # noqa: E402
from fastunlearn.ops import dispatch  # noqa: E402
from tests.helpers.runs import DEMO, as_set  # noqa: E402
from tests.helpers.tiny_models import memorize, tiny_model, word_tokenizer  # noqa: E402

WORKSPACE_WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture
def force_impl():
    """force_impl(name) -> context manager forcing that backend."""
    return dispatch._force_impl


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Caches (the demo's memorized model, the held-out baseline) go to a temporary directory, never to the
    user's ~/.cache; session-wide, so module-scoped fixtures' runs use it too (tests that need their own set it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path_factory.mktemp("fastunlearn-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps run times steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny GPT-Neo with a word-level tokenizer, and forget / retain / held-out text files (one per
    module: tests write their runs into it)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer(WORKSPACE_WORDS)
    tiny_model("gpt_neo").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    for name, n in (("forget", 4), ("retain", 8), ("heldout", 4)):
        lines = [" ".join(rng.choice(WORKSPACE_WORDS) for _ in range(14)) for _ in range(n)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def demo_memorizer():
    """(the GPT-Neo that memorized ``DEMO``'s random tokens, {"forget" | "retain" | "heldout": ids}), trained once
    per session in one thread; the module fixtures below hand each module its own copy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, sets = memorize(DEMO)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), sets


@pytest.fixture(scope="module")
def memorized(demo_memorizer, one_thread):
    """(the memorizer, its sets as UnlearningData(forget, retain, heldout)), a copy per module."""
    model, sets = copy.deepcopy(demo_memorizer)
    return model, UnlearningData(as_set(sets["forget"]), as_set(sets["retain"]), as_set(sets["heldout"]))


@pytest.fixture(scope="module")
def memorized_sets(demo_memorizer, one_thread):
    """(the memorizer, {"forget" | "retain" | "heldout": SequenceSet}), a copy per module."""
    model, sets = copy.deepcopy(demo_memorizer)
    return model, {name: as_set(ids) for name, ids in sets.items()}
