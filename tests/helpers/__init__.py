"""What the test files share, imported as ``tests.helpers.<module>``:

- ``tiny_models``: tiny GPT-Neo / GPT-2 / tied Llama models, word-level tokenizers, the memorizer of random tokens
- ``runs``: the memorizer's unlearning settings (``DEMO``, ``FAST``, ``NEVER``), ``as_set``, the ``Interrupt`` hook
- ``reference``: float64 references of the ops and the per-dtype tolerances of every backend's tests
- ``backends``: ``IMPL_PARAMS`` (every backend that can run here) and the Triton interpreter marks
- ``hf``: the Hugging Face Trainer tests' data, batches and ``TrainingArguments``
- ``qa``, ``tofu``: word-level tokenizers and question/answer pairs of the QA and TOFU tests
- ``dist_cases``: the multi-process cases of ``tests/engine/test_distributed.py``
- ``paths``: the repository root and the optional reference data beside it

The fixtures (``workspace``, ``memorized``, ``one_thread``, ...) are in ``tests/conftest.py``."""
