"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decoration runs, so it is set here,
before anything imports fastunlearn.kernels: CPU tensors then run the real Triton kernels."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastunlearn.ops import dispatch  # noqa: E402

# (impl, skip reason or None): every path that can run here, the torch reference path always.
IMPL_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "csrc", id="csrc", marks=pytest.mark.skipif(not dispatch.has_csrc(), reason="fastunlearn._C not built")
    ),
    pytest.param(
        "triton",
        id="triton",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(not dispatch.has_triton(), reason="triton not installed"),
            pytest.mark.skipif(not dispatch.triton_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1"),
        ],
    ),
]


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
