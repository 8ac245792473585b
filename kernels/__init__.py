"""Fused Triton kernels of fastunlearn, installed as ``fastunlearn.kernels`` (they import triton).

The folder sits at the repository root, so from a checkout's root (``python -c``, ``python -m``, ``torchrun
-m``, pytest) it is also found under the top-level name ``kernels``, which belongs to another PyPI project
(Hugging Face's hub kernels, imported by transformers). Imported under that name, this file hands the import
over: it loads the installed ``kernels`` distribution from the rest of ``sys.path`` in its place, or raises
``ModuleNotFoundError`` when there is none. So nothing of this folder is ever importable as ``kernels``.
"""

if __name__ != "fastunlearn.kernels":  # found as a top-level package from a checkout's root: hand over
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (the folder {os.path.dirname(os.path.abspath(__file__))} is "
            "fastunlearn.kernels, not the PyPI project 'kernels')",
            name=__name__,
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what `import kernels` returns, also while the real package imports itself
    _spec.loader.exec_module(_module)
