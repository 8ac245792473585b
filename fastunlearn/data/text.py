"""Forget / retain / held-out data: load texts, tokenize them into fixed-length sequences, batch them.

- ``load_texts``: documents from a ``.txt`` / ``.jsonl`` / ``.csv`` file, a ``datasets`` dataset (a
  ``save_to_disk`` directory, a local data directory or a Hub name), or a list of strings.
- ``tokenize_sequences``: a ``SequenceSet`` of (N, seq_len) ids. ``"truncate"`` keeps one row per text (the
  paper's forget sets: one 200-token sequence each); ``"pack"`` cuts the eos-joined stream into full blocks
  (retain / utility text).
- ``load_unlearning_data``: both steps for the forget, retain and held-out sets, errors naming the set.
- ``split_tasks`` (continual unlearning: 128 sequences -> 4 tasks of 32) and ``iterate_batches``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastunlearn.data.labels import answer_start
from fastunlearn.utils.optional import missing

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MODES = ("truncate", "pack")
FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
Source = str | os.PathLike | Sequence[str]


# ---------------------------------------------------------------------------------------------------------
# Loading texts
# ---------------------------------------------------------------------------------------------------------
def _read_txt(path: Path) -> list[str]:
    """One document per non-blank line; if blank lines separate non-blank ones, one per paragraph instead."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks = [list(block) for blank, block in groupby(lines, key=lambda line: not line.strip()) if not blank]
    if len(blocks) > 1:
        return ["\n".join(block) for block in blocks]
    return blocks[0] if blocks else []


def _field(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        raise ValueError(f"{where} has no field {text_field!r}; available: {', '.join(map(str, record)) or 'none'}")
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where} field {text_field!r} is {value!r:.40}, not a string")
    return value


def _read_jsonl(path: Path, text_field: str, role: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{role} file {path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
            texts.append(_field(record, text_field, where))
    return texts


def _read_csv(path: Path, text_field: str, role: str) -> list[str]:
    """A header row, then records; quoted fields may hold commas, doubled quotes and newlines."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None:
                return []
            if text_field not in reader.fieldnames:
                raise ValueError(
                    f"{role} file {path} has no column {text_field!r}; available: {', '.join(reader.fieldnames)}"
                )
            return [_field(row, text_field, f"{role} file {path} record {n}") for n, row in enumerate(reader, 1)]
        except csv.Error as err:
            raise ValueError(f"{role} file {path} is not valid CSV (line {reader.line_num}): {err}") from None


def _read_file(path: Path, suffix: str, text_field: str, role: str) -> list[str]:
    """A .txt / .jsonl / .csv file; errors name it (a directory, unreadable, not UTF-8)."""
    try:
        if suffix == ".txt":
            return _read_txt(path)
        return _read_jsonl(path, text_field, role) if suffix == ".jsonl" else _read_csv(path, text_field, role)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{role} file {path} is not UTF-8 text ({err.reason}: byte {err.object[err.start]:#04x}); convert it "
            "to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    except OSError as err:
        raise ValueError(f"{role} file {path} cannot be read: {err.strerror}") from None


# The data file formats ``datasets.load_dataset`` reads from a local folder, by extension: a folder is one
# dataset of one format, so a folder holding two of them is refused, naming a file of each.
FOLDER_FORMATS = {".txt": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                  ".parquet": "parquet", ".arrow": "arrow"}  # fmt: skip


def check_data_folder(path: Path, role: str) -> None:
    """ValueError naming ``role`` and the files when folder ``path`` (not a ``save_to_disk`` folder) holds data
    files of more than one format (``FOLDER_FORMATS``; hidden files and folders are not read), or none."""
    formats: dict[str, Path] = {}
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            fmt = FOLDER_FORMATS.get(Path(name).suffix.lower())
            if fmt is not None and not name.startswith("."):
                formats.setdefault(fmt, Path(folder) / name)
    if len(formats) > 1:
        found = ", ".join(f"{file} ({fmt})" for fmt, file in formats.items())
        raise ValueError(f"{role} folder {path} holds files of {len(formats)} formats ({found}): a folder is read as "
                         "one dataset of one format; give one file, or a folder of one format")  # fmt: skip
    if not formats:
        raise ValueError(f"{role} folder {path} holds no data file ({', '.join(FOLDER_FORMATS)}) and is not a "
                         "datasets save_to_disk folder")  # fmt: skip


def _load_dataset(source: str, split: str, config: str | None, role: str):
    """A ``datasets.Dataset``: a ``save_to_disk`` folder (its ``split`` if it holds several), a local data folder
    (``check_data_folder``; a file it cannot read is a ValueError naming the folder) or a Hub name
    (HF_HUB_OFFLINE=1 restricts the latter to the local cache)."""
    try:
        import datasets
    except ImportError:
        raise missing("datasets", "engine", f"{role} {source!r} (not a .txt/.jsonl/.csv file: a dataset)") from None
    path = Path(source)
    if any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):  # a save_to_disk folder
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{role} dataset {source} has no split {split!r}; available: {', '.join(dataset)}")
            dataset = dataset[split]
        return dataset
    if not path.is_dir():
        return datasets.load_dataset(str(source), config, split=split)
    check_data_folder(path, role)
    try:
        return datasets.load_dataset(str(source), config, split=split)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise ValueError(f"{role} folder {path} cannot be read as a dataset ({reason})") from None


def _read_dataset(source: str, text_field: str, split: str, config: str | None, role: str) -> list[str]:
    dataset = _load_dataset(source, split, config, role)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{role} dataset {source} has no column {text_field!r}; available: {', '.join(dataset.column_names)}"
        )
    texts = list(dataset[text_field])
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{role} dataset {source} row {index} {text_field!r} is {text!r:.40}, not a string")
    return texts


def read_dataset_records(source: str, split: str, role: str) -> list[tuple[str, dict]]:
    """(where, row as a dict) for every row of a dataset (``_load_dataset``)."""
    dataset = _load_dataset(source, split, None, role)
    return [(f"{role} dataset {source} row {i}", dict(row)) for i, row in enumerate(dataset)]


def load_texts(
    source: Source,
    *,
    text_field: str = "text",
    split: str = "train",
    config: str | None = None,
    role: str = "data",
) -> list[str]:
    """The documents of ``source``, verbatim (no stripping: leading spaces are tokens).

    ``source`` is one of:

    - a ``.txt`` file: one document per line; but when a blank (or whitespace-only) line separates
      non-blank lines, each blank-line-separated paragraph is one document (its lines joined by newlines);
    - a ``.jsonl`` file: one JSON object per non-blank line, the document in ``text_field``;
    - a ``.csv`` file with a header: the document in column ``text_field`` (standard quoting, so fields
      may hold commas, ``""`` and newlines, as in the TDEC files);
    - a directory written by ``datasets``' ``save_to_disk`` (``split`` picks from a ``DatasetDict``), or any
      other directory or Hub name (a source without an extension that is not a local file), read with
      ``datasets.load_dataset(source, config, split=split)``; set ``HF_HUB_OFFLINE=1`` to use only the cache;
    - a list of strings, returned as a new list after the same checks.

    ``role`` names the set in errors ("forget set file not found: ..."). Raises ``FileNotFoundError`` for a
    missing file, ``ValueError`` for an unsupported extension, a file that is not UTF-8 or cannot be read, a
    missing field or column (listing those available), a non-string document, or no documents at all.
    """
    if isinstance(source, (list, tuple)):
        texts = list(source)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{role} text {index} is {text!r:.40}, not a string")
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if path.is_dir() or not (path.suffix or path.exists()):  # a datasets folder, or a name without extension
            texts = _read_dataset(str(source), text_field, split, config, role)
        elif not path.exists():
            raise FileNotFoundError(f"{role} file not found: {path}")
        elif suffix not in FILE_SUFFIXES:
            raise ValueError(
                f"{role} file {path} has unsupported extension {path.suffix!r}; "
                f"expected one of {', '.join(FILE_SUFFIXES)} or a datasets directory"
            )
        else:
            texts = _read_file(path, suffix, text_field, role)
    if not texts:
        raise ValueError(f"{role} is empty: no texts in {'the list' if isinstance(source, (list, tuple)) else source}")
    return texts


# ---------------------------------------------------------------------------------------------------------
# Tokenizing into fixed-length sequences
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SequenceSet:
    """Token sequences of one set: ``input_ids`` and ``attention_mask`` (N, L) int64, padding on the right
    with mask 0; ``source_index`` (N,) int64, the text each row starts in (the position in the loaded list).

    ``labels`` (N, L) int64 or None: Hugging Face-style targets aligned with ``input_ids``, -100 where no loss or
    metric counts (the prompt of a question/answer pair, ``fastunlearn.data.qa``). None: every real token counts.
    """

    input_ids: Tensor
    attention_mask: Tensor
    source_index: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2 or self.input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be a 2-D int64 tensor, got {self.input_ids.dtype} of shape {shape}")
        if tuple(self.attention_mask.shape) != shape:
            raise ValueError(f"attention_mask has shape {tuple(self.attention_mask.shape)} but input_ids has {shape}")
        if tuple(self.source_index.shape) != shape[:1]:
            raise ValueError(f"source_index has shape {tuple(self.source_index.shape)} but input_ids has {shape}")
        if self.labels is not None and (tuple(self.labels.shape) != shape or self.labels.dtype != torch.int64):
            raise ValueError(f"labels must be int64 of shape {shape} like input_ids, got {self.labels.dtype} "
                             f"of shape {tuple(self.labels.shape)}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index) -> SequenceSet:
        """The rows ``index`` selects (an int, slice, index list or tensor) as a new set."""
        if isinstance(index, int):
            index = [index]
        labels = None if self.labels is None else self.labels[index]
        return SequenceSet(self.input_ids[index], self.attention_mask[index], self.source_index[index], labels)

    def batch(self, index=slice(None)) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"[, "labels"]}`` of the rows ``index`` selects (for ``model(**batch)``)."""
        out = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.labels is not None:
            out["labels"] = self.labels[index]
        return out

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def check_el_length(self, name: str, el_n: int) -> None:
        """ValueError naming the set unless every sequence, without its padding, has more than ``el_n`` tokens
        (EL_n scores the continuations of every prefix that leaves an n-gram to extract); with ``labels``, unless
        every answer (from its first labelled position to the end of the row) has at least ``el_n`` tokens."""
        lengths = self.attention_mask.sum(1)
        if self.labels is None:
            shortest = int(lengths.min())
            if shortest <= el_n:
                raise ValueError(
                    f"{name} has a sequence of {shortest} tokens; EL_{el_n} (el_n={el_n}) needs at least {el_n + 1}"
                )
            return
        answers = lengths - answer_start(self.labels).clamp(min=1)  # (N,): tokens from the answer's start on
        row = int(answers.argmin())
        if int(answers[row]) < el_n:
            raise ValueError(f"{name} row {row} has an answer of {max(int(answers[row]), 0)} labelled tokens; "
                             f"EL_{el_n} (el_n={el_n}) needs answers of at least {el_n}")  # fmt: skip


@dataclass(frozen=True)
class SequenceConfig:
    """How ``tokenize_sequences`` turns texts into rows; see there."""

    seq_len: int = 200
    mode: str = "truncate"
    min_len: int = 1
    add_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (a next-token target needs 2 tokens), got {self.seq_len!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.min_len, int) or self.min_len < 0:
            raise ValueError(f"min_len must be an int >= 0, got {self.min_len!r}")


def special_id(tokenizer: PreTrainedTokenizerBase, names: tuple[str, ...], role: str, purpose: str) -> int:
    for name in names:
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return token_id
    raise ValueError(f"{role}: the tokenizer has no {' or '.join(names)} for {purpose}; set its pad_token / eos_token")


def tokenize_sequences(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int = 200,
    mode: str = "truncate",
    min_len: int = 1,
    add_eos: bool = False,
    role: str = "data",
) -> SequenceSet:
    """Tokenize ``texts`` (with the tokenizer's own special tokens, e.g. a BOS) into a ``SequenceSet``.

    - ``"truncate"``: one row per text, its first ``seq_len`` tokens (after appending eos if ``add_eos``);
      a shorter text is padded on the right with the pad token (eos when there is none), mask 0.
    - ``"pack"``: the texts joined into one stream with an eos after each (``add_eos`` is implied), cut into
      full ``seq_len`` blocks; the incomplete tail is dropped; the mask is all ones.

    Every text must have at least ``min_len`` tokens (eos not counted): a shorter one raises ``ValueError``
    naming it rather than being dropped, so a forget set never silently shrinks. The default 1 rejects
    empty texts; ``min_len=0`` accepts them (an empty text is then an all-padding row in truncate mode).
    """
    SequenceConfig(seq_len, mode, min_len, add_eos)  # validates
    if not texts:
        raise ValueError(f"{role} is empty: no texts to tokenize")
    encoded = tokenizer(list(texts), verbose=False)["input_ids"]
    for index, ids in enumerate(encoded):
        if len(ids) < min_len:
            raise ValueError(
                f"{role} text {index} has {len(ids)} tokens, fewer than min_len={min_len}: {texts[index][:60]!r}"
            )
    if mode == "pack":
        eos = special_id(tokenizer, ("eos_token_id",), role, "separating packed texts")
        stream = torch.tensor([token for ids in encoded for token in [*ids, eos]], dtype=torch.int64)
        n_rows = len(stream) // seq_len
        if n_rows == 0:
            raise ValueError(f"{role} has {len(stream)} tokens with separators, fewer than one seq_len={seq_len} block")
        owner = torch.repeat_interleave(torch.tensor([len(ids) + 1 for ids in encoded]))
        input_ids = stream[: n_rows * seq_len].view(n_rows, seq_len)
        return SequenceSet(input_ids, torch.ones_like(input_ids), owner[: n_rows * seq_len : seq_len])
    pad = special_id(tokenizer, ("pad_token_id", "eos_token_id"), role, "padding")
    eos = [special_id(tokenizer, ("eos_token_id",), role, "add_eos")] if add_eos else []
    input_ids = torch.full((len(encoded), seq_len), pad, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        ids = [*ids, *eos][:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    return SequenceSet(input_ids, attention_mask, torch.arange(len(encoded)))


# ---------------------------------------------------------------------------------------------------------
# The three sets, continual tasks, batches
# ---------------------------------------------------------------------------------------------------------
@dataclass
class UnlearningData:
    """The forget set, and optionally the retain set (for the retain loss), a held-out set (EL / MA
    reference values measured on sequences the model never saw) and utility sets: {name: text never trained on}
    whose perplexity shows what unlearning costs the model."""

    forget: SequenceSet
    retain: SequenceSet | None = None
    heldout: SequenceSet | None = None
    utility: dict[str, SequenceSet] | None = None


def load_unlearning_data(
    tokenizer: PreTrainedTokenizerBase,
    forget: Source,
    retain: Source | None = None,
    heldout: Source | None = None,
    *,
    seq_len: int = 200,
    retain_mode: str = "pack",
    min_len: int = 1,
    add_eos: bool = False,
    text_field: str = "text",
    split: str = "train",
    utility: Mapping[str, Source] | None = None,
) -> UnlearningData:
    """Load (``load_texts``) and tokenize (``tokenize_sequences``) each given set.

    The forget and held-out sets are truncated (one ``seq_len`` row per text, as the paper's 200-token
    sequences); the retain set uses ``retain_mode`` (``"pack"`` by default: running text cut into blocks), and
    so does each utility set ({name: source}, named "utility set NAME" in errors).
    ``min_len``, ``add_eos``, ``text_field`` and ``split`` apply to every set; for per-set settings, pass
    lists from ``load_texts``. Errors name the set ("retain set file not found: ...").
    """
    truncate = SequenceConfig(seq_len, "truncate", min_len, add_eos)  # validated before any file is read
    retain_config = SequenceConfig(seq_len, retain_mode, min_len, add_eos)
    configs = {"forget": truncate, "retain": retain_config, "heldout": truncate}
    sets = {}
    for name, source in (("forget", forget), ("retain", retain), ("heldout", heldout)):
        if source is not None:
            role = f"{name} set"
            texts = load_texts(source, text_field=text_field, split=split, role=role)
            sets[name] = tokenize_sequences(texts, tokenizer, **asdict(configs[name]), role=role)
    if utility:
        sets["utility"] = {}
        for name, source in utility.items():
            role = f"utility set {name}"
            texts = load_texts(source, text_field=text_field, split=split, role=role)
            sets["utility"][name] = tokenize_sequences(texts, tokenizer, **asdict(retain_config), role=role)
    return UnlearningData(**sets)


def split_tasks(seqs: SequenceSet, n_tasks: int) -> list[SequenceSet]:
    """Consecutive equal parts of ``seqs`` for continual unlearning (128 sequences, 4 tasks -> 4 x 32)."""
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
    if len(seqs) % n_tasks:
        raise ValueError(f"{len(seqs)} sequences cannot be split into n_tasks={n_tasks} equal tasks")
    size = len(seqs) // n_tasks
    return [seqs[task * size : (task + 1) * size] for task in range(n_tasks)]


def iterate_batches(
    seqs: SequenceSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """One pass over ``seqs`` in batches ``{"input_ids", "attention_mask"[, "labels"]}`` (``SequenceSet.batch``).

    ``shuffle`` draws the order from ``generator`` (the global RNG when None): a generator seeded the same
    way gives the same batches. ``drop_last`` drops a final batch smaller than ``batch_size``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = torch.randperm(len(seqs), generator=generator) if shuffle else torch.arange(len(seqs))
    stop = len(seqs) - len(seqs) % batch_size if drop_last else len(seqs)
    chunks = (order[start : start + batch_size] for start in range(0, stop, batch_size))
    return (seqs.batch(i) for i in chunks)
