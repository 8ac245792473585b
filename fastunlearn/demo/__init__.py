"""The demos behind ``fastunlearn demo``: a tiny GPT-Neo forgets synthetic personal records (``toy``), and the same
story on SmolLM2-135M-Instruct (``real``, ``fastunlearn demo --real``; the model from ``smollm2``). ``config``: the
settings both share; ``data``: the records; ``cache``: the memorized models."""
