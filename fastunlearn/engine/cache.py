"""The held-out baseline cache: the held-out set's MA and EL_n before unlearning, kept across runs.

The held-out EL is the largest evaluation cost of a run (a greedy decode per prefix) and depends only on the
model as given, the held-out set and how EL is measured, so a rerun, or a sweep over methods in new output
directories, reads it instead of measuring it again. A file ``<cache root>/heldout-baseline/<key>.json``
(written atomically) per key: ``model_fingerprint`` of the model as given (after its cast to ``dtype``,
before any adapter), the held-out set's data fingerprint, ``el_n``, ``dtype``, the device type and the
fastunlearn version. Not in the key, since they change only float rounding: ``eval_batch_size``, the number
of processes, and the trained parameters (a FILA model starts as W0 - s B0 A0 + s B0 A0, equal to the model
as given up to rounding): a cached value is the one the first run measured.

Cache root: ``$FASTUNLEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastunlearn``, else ``~/.cache/fastunlearn``
(the demo's memorized model lives there too). A root that cannot be written is warned about once and the
run goes on uncached; an unreadable or mismatching file is a miss (and is replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from fastunlearn import __version__
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.inputs import fingerprint
from fastunlearn.models import cache_root
from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.atomic import atomic_write

logger = logging.getLogger("fastunlearn.engine")

FORMAT = 1  # bump when a cached file changes meaning
SUBDIR = "heldout-baseline"
_warned: set[Path] = set()  # unwritable cache directories already warned about (once per process)


class HeldoutCache:
    """The cache entry of one (model, held-out set, settings); ``load`` and ``store`` act on rank 0 only."""

    def __init__(self, model_fp: str, heldout: SequenceSet, cfg: UnlearnConfig, device: torch.device,
                 variant: str | None = None) -> None:  # fmt: skip
        """``variant``: the model as given seen another way (``engine.deploy``: deployed in a quantization
        format), a key of its own; None: the model itself."""
        self.key = {
            "format": FORMAT, "fastunlearn": __version__, "model": model_fp, "heldout": fingerprint([heldout]),
            "el_n": cfg.el_n, "dtype": cfg.dtype, "device": torch.device(device).type,
        }  # fmt: skip
        if variant is not None:
            self.key["variant"] = variant
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = cache_root() / SUBDIR / f"{digest}.json"

    def load(self) -> dict | None:
        """{"ma", "el"} stored under this key, on every rank (rank 0 reads, then broadcasts); None: a miss."""
        values = self._read() if dist_utils.current().is_main else None
        return _broadcast(values)

    def _read(self) -> dict | None:
        try:
            stored = json.loads(self.path.read_text())
            values = {"ma": stored["heldout"]["ma"], "el": stored["heldout"]["el"]}
            if stored["key"] != self.key or not all(_is_fraction(v) for v in values.values()):
                return None
            return values
        except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable, not JSON or another layout
            return None

    def store(self, values: dict, n_sequences: int) -> None:
        """Write ``values`` ({"ma", "el"}) under this key (rank 0); an unwritable root: one warning, no file."""
        if not dist_utils.current().is_main:
            return
        entry = {"key": self.key, "heldout": {"ma": values["ma"], "el": values["el"]}, "sequences": n_sequences}
        try:
            atomic_write(self.path, json.dumps(entry, indent=1) + "\n")
        except OSError as exc:
            directory = self.path.parent
            if directory not in _warned:
                _warned.add(directory)
                logger.warning("cannot write the held-out baseline cache in %s (%s); running without it", directory,
                               exc)  # fmt: skip


def _is_fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _broadcast(values: dict | None) -> dict | None:
    """Rank 0's ``values`` on every rank (float64: exact); as given in a one-process run."""
    if not dist_utils.current().distributed:
        return values
    hit = values is not None
    t = torch.tensor([hit, values["ma"] if hit else 0.0, values["el"] if hit else 0.0], dtype=torch.float64)
    t = t.to(dist_utils.comm_device())
    torch.distributed.broadcast(t, src=0)
    hit, ma, el = t.tolist()
    return {"ma": ma, "el": el} if hit else None
