"""Where the tests find the repository and the optional reference data (tests that need it skip without it)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: README.md, fastunlearn/, kernels/, tests/
SHARED_DATA = ROOT.parent / "shared" / "data"  # reference data sets beside the checkout (tdec/, tofu/)
