"""The demo's data: synthetic personal records and a BPE tokenizer trained on the same kind of text.

A record reads like a customer-database row a person could ask to have forgotten::

    Tamsin Castillo, born 23 February 1964, phone 781-327-3909, lives at 37 Lantern Avenue, Millbrook.
    Licence C6-8322-S.

Everything comes from a seeded ``random.Random`` and the small word lists below: no network, no files.
Every record of one demo has a different first name, so the name that starts it identifies the person.
"""

from __future__ import annotations

import random

FIRST_NAMES = (
    "Maria Jonas Aiko Pedro Leila Tomasz Ingrid Kwame Sofia Ravi Helena Oscar Yuki Amara Lukas Nadia Felix "
    "Chiara Emeka Hana Viktor Elena Mateo Freya Idris Lena Tariq Mira Anton Zara Bruno Alma Hugo Noor Milan "
    "Esme Dario Ines Kenji Olga Rafael Selma Arjun Clara Omar Vera Nils Rosa Ezra Tamsin Luca Farah Henrik "
    "Greta Samir Paula Jakob Keiko Marco Dina Otto Sanne Emil Lucia Boris Maya Ivo Petra Aziz Nora Cyrus "
    "Edith Jalen Ada Remy Wanda Silas Ilse Teodor Beatriz"
).split()
LAST_NAMES = (
    "Keller Okafor Lindqvist Moreau Tanaka Novak Ferreira Haddad Brennan Kowalski Dubois Santos Mehta Larsen "
    "Rossi Ivanova Fischer Nakamura Osei Petrov Castillo Andersen Walsh Bauer Yilmaz Hughes Costa Sato Nilsson "
    "Romero Adeyemi Schmidt Varga Quinn Horvat Lambert Mendes Berg Kaur Duarte"
).split()
STREETS = (
    "Birch Harbor Linden Maple Quarry Willow Chapel Orchard Mill Heather Juniper Beacon Cedar Foundry Kestrel "
    "Rowan Aspen Lantern Meadow Copper"
).split()
STREET_KINDS = "Lane Road Street Avenue Close Way".split()
TOWNS = "Oakford Millbrook Eastwick Redhaven Stonebridge Fairmont Ashby Kingsport Larkfield Westmere".split()
MONTHS = "January February March April May June July August September October November December".split()
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
EOS = "<|endoftext|>"
TOKENIZER_CORPUS = 2000  # records (other people, another random stream) the tokenizer is trained on


def record(rng: random.Random, first_name: str) -> str:
    """One person's record: name, birth date, phone, address, driving licence number."""
    return (
        f"{first_name} {rng.choice(LAST_NAMES)}, born {rng.randint(1, 28)} {rng.choice(MONTHS)} "
        f"{rng.randint(1940, 2005)}, phone {rng.randint(200, 999)}-{rng.randint(100, 999)}-"
        f"{rng.randint(0, 9999):04d}, lives at {rng.randint(1, 199)} {rng.choice(STREETS)} "
        f"{rng.choice(STREET_KINDS)}, {rng.choice(TOWNS)}. Licence {rng.choice(LETTERS)}{rng.randint(1, 9)}-"
        f"{rng.randint(0, 9999):04d}-{rng.choice(LETTERS)}."
    )


def person(text: str) -> str:
    """The name a record starts with (the text before its first comma)."""
    return text.split(",", 1)[0]


def make_records(seed: int, sizes: dict[str, int]) -> dict[str, list[str]]:
    """{set name: records}, e.g. sizes {"forget": 12, "retain": 36, "heldout": 12}; every record has its own
    first name (at most ``len(FIRST_NAMES)`` records in all)."""
    total = sum(sizes.values())
    if total > len(FIRST_NAMES):
        raise ValueError(f"at most {len(FIRST_NAMES)} records in all (one per first name), got {total}")
    rng = random.Random(seed)
    names = iter(rng.sample(FIRST_NAMES, total))
    return {name: [record(rng, next(names)) for _ in range(size)] for name, size in sizes.items()}


def train_tokenizer(seed: int, vocab_size: int):
    """A byte-level BPE (GPT-2 style, ``<|endoftext|>`` as eos and pad) trained on ``TOKENIZER_CORPUS`` records
    of other people, as a ``PreTrainedTokenizerFast``. Any text encodes (no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer-{seed}")
    corpus = [record(rng, rng.choice(FIRST_NAMES)) for _ in range(TOKENIZER_CORPUS)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)
