"""Benchmark session setup: results shared between the timing tests and the target checks."""

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """The repository's addopts disable pytest-benchmark for the test suite; these modules are benchmarks."""
    config.option.benchmark_disable = False


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def results() -> dict:
    """(provider, mode, shape, dtype) -> {"median_s": ..., "extra_bytes_per_row": ..., ...}, filled by timings."""
    return {}
