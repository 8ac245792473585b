"""The demos behind ``fastunlearn demo``: a tiny GPT-Neo forgets synthetic personal records (``toy``), and the same
story on SmolLM2-135M-Instruct (``real``, ``fastunlearn demo --real``)."""
