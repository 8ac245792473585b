"""The data a run is given: texts loaded and tokenized into fixed-length sequence sets (``text``), question/answer
pairs with the loss on the answer (``qa``), and which tokens are scored (``labels``). The text names are
importable from here."""

from fastunlearn.data.text import (
    SequenceConfig,
    SequenceSet,
    UnlearningData,
    iterate_batches,
    load_texts,
    load_unlearning_data,
    split_tasks,
    tokenize_sequences,
)

__all__ = [
    "SequenceConfig",
    "SequenceSet",
    "UnlearningData",
    "iterate_batches",
    "load_texts",
    "load_unlearning_data",
    "split_tasks",
    "tokenize_sequences",
]
