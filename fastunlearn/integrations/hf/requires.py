"""Imported first by ``fastunlearn.integrations.hf``: without transformers or accelerate, say which extra to install."""

from fastunlearn.utils.optional import missing

try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
    import transformers  # noqa: F401
except ImportError as exc:
    raise missing(exc.name or "transformers", "hf", "fastunlearn.integrations.hf") from exc
