"""Builds the C++/CUDA extension `fastunlearn._C`; all metadata lives in pyproject.toml.

- No CUDA toolkit (or FASTUNLEARN_FORCE_CPU_BUILD=1): a `CppExtension` from `csrc/*.cpp`.
- CUDA toolkit found: a `CUDAExtension` from `csrc/*.cpp` and `csrc/*.cu`.
- FASTUNLEARN_SKIP_CSRC_BUILD=1: no extension; `import fastunlearn` then uses the pure-torch fallback.

Build against the installed torch: `pip install --no-build-isolation .`
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FASTUNLEARN_SKIP_CSRC_BUILD"):
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
    cuda_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cu")))
    cxx_flags = ["-O3", "-std=c++17"]
    use_cuda = CUDA_HOME is not None and not _flag("FASTUNLEARN_FORCE_CPU_BUILD")
    if use_cuda:
        ext = CUDAExtension(
            "fastunlearn._C",
            sources + cuda_sources,
            include_dirs=[CSRC],
            define_macros=[("FASTUNLEARN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
    else:
        ext = CppExtension("fastunlearn._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
