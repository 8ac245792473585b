"""The TOFU tests' data: question/answer pairs of random words (with paraphrased and perturbed answers) and a
word-level tokenizer over those words whose special tokens fit the tiny GPT-Neo."""

from __future__ import annotations

import numpy as np

from fastunlearn.data.qa import QAPair
from tests.helpers.tiny_models import VOCAB

WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # "wK" has id K + 4


def word_tokenizer():
    """Whitespace word-level tokenizer: <eos>=0 (the tiny model's eos), <unk>=1, "Question:"=2, "Answer:"=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "Question:": 2, "Answer:": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def text(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), n))


def make_pairs(n: int, seed: int, k: int = 3, paraphrase: bool = True) -> list[QAPair]:
    """Self-made QA pairs of random words, of different lengths (2-4 word questions, 1-5 word answers)."""
    rng = np.random.default_rng(seed)
    return [
        QAPair(text(rng, int(rng.integers(2, 5))), text(rng, int(rng.integers(1, 6))),
               text(rng, int(rng.integers(1, 6))) if paraphrase else None,
               tuple(text(rng, int(rng.integers(1, 6))) for _ in range(k)))
        for _ in range(n)
    ]  # fmt: skip
