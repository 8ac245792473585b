"""Optional dependencies: an import that fails says which extra installs the package.

The core (losses, LoRA, FILA, Fisher, low-rank, export) needs torch, numpy, safetensors and tqdm only. The
extras ``engine`` (transformers, datasets, matplotlib: ``fastunlearn.unlearn``, the metrics, the fused IHL of
Hugging Face models, the CLI), ``hf`` (transformers, accelerate: ``fastunlearn.integrations.hf``) and ``lm-eval``
add the rest. Use::

    try:
        from transformers import DynamicCache
    except ImportError as exc:
        raise missing("transformers", "engine", "fastunlearn.evals.metrics") from exc
"""

from __future__ import annotations


def missing(package: str, extra: str, feature: str) -> ImportError:
    """The ImportError for ``feature`` without ``package``: it names the package and ``pip install`` of the extra."""
    return ImportError(f'{feature} needs the package {package!r}: install it with pip install "fastunlearn[{extra}]"')
