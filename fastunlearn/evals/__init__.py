"""Measuring a model: the TDEC metrics (``metrics``: MA, EL_n, perplexity), TOFU's forget quality and model
utility (``tofu``) and downstream tasks through lm-evaluation-harness (``downstream``)."""
