"""The backends a test runs on: ``IMPL_PARAMS`` parametrizes a test over every path that can run here (the
torch reference path always), ``interpreter`` marks a test that runs a Triton kernel on CPU tensors."""

import pytest

from fastunlearn.ops import dispatch

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


def interpreter(test):
    """The marks of a test that runs the Triton kernel on CPU tensors."""
    test = pytest.mark.skipif(not dispatch.triton_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")(test)
    test = pytest.mark.skipif(not dispatch.has_triton(), reason="triton not installed")(test)
    return pytest.mark.interpreter(test)
