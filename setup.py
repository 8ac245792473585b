"""Builds the C++ extension `fastunlearn._C` (CPU kernels of the Inverted Hinge Loss) and lists the packages;
metadata lives in pyproject.toml.

- Packages are discovered: every folder of `fastunlearn/` with an `__init__.py`, and the top-level `kernels/`
  folder installed as `fastunlearn.kernels` (the top-level name `kernels` belongs to another PyPI project).

- Always a `CppExtension` from `csrc/*.cpp`: CPU code only, with or without a CUDA toolkit. `-fno-trapping-math`
  (no floating-point exception is ever observed) lets the compiler vectorize loops holding float selects; it
  changes no value. There are no CUDA
  sources: CUDA tensors run the Triton kernels (`kernels/`, installed as `fastunlearn.kernels`), which need
  no build step.
- FASTUNLEARN_SKIP_CSRC_BUILD=1: no extension; `import fastunlearn` then uses the pure-torch path on CPU.

Build against the installed torch: `pip install --no-build-isolation .`
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FASTUNLEARN_SKIP_CSRC_BUILD"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
    ext = CppExtension(
        "fastunlearn._C",
        sources,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fno-trapping-math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


PACKAGES = [*find_packages(ROOT, include=["fastunlearn", "fastunlearn.*"]), "fastunlearn.kernels"]

ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir={"fastunlearn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
