"""Benchmark session setup: results shared between the timing tests and the target checks."""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def results() -> dict:
    """(provider, mode, shape, dtype) -> {"median_s": ..., "extra_bytes_per_row": ..., ...}, filled by timings."""
    return {}
