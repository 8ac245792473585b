"""The run log as typed records: what the unlearning recipe fills as it goes, and what ``log.json`` (and the
checkpoint's ``state.json``) hold.

:class:`RunLog` holds the run's settings and sizes (:class:`DataInfo`, :class:`ModelInfo`), the criterion, the
metrics before unlearning (:class:`Baseline`), one :class:`TaskLog` per forget set (its :class:`EpochRecord` list
and, once it stopped, :class:`TaskAfter`), the outputs and the :class:`Timings`. ``RunLog.to_dict()`` is the
JSON document, with the keys, nesting and value types the engine has always written; ``RunLog.from_dict`` reads
one back (a checkpoint to resume, an old ``log.json``). The leaves the evaluation functions and the Hugging Face
callback share stay plain dicts: a set's metrics ``{"ma", "el"}`` (``"met"`` added after a task), the criterion
``{"stop", "ma", "el"}``, per-set perplexities ``{name: float}`` and the evaluation hook's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

Metrics = dict  # {"ma": float, "el": float | None}: a set's mean MA and EL_n (EL None when not measured)
Criterion = dict  # {"stop": str, "ma": float | None, "el": float | None}: the limits (None with stop="epochs")


def plain(value: Any) -> Any:
    """``value`` with every record in it replaced by its dict (lists and dicts copied)."""
    if is_dataclass(value):
        return value.to_dict()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Record:
    """A dataclass whose fields are the keys of a JSON object, in order (``field(metadata={"key": ...})`` where
    the key is not a Python name). ``OPTIONAL`` keys are left out while None (written only when there is a value);
    ``NESTED`` / ``NESTED_LISTS`` name the fields that hold a record / a list of records."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[dict[str, type[Record]]] = {}
    NESTED_LISTS: ClassVar[dict[str, type[Record]]] = {}

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            out[f.metadata.get("key", f.name)] = plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        """The record of a dict that ``to_dict`` wrote; KeyError / TypeError for another shape."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        keys = {f.metadata.get("key", f.name): f.name for f in fields(cls)}
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise KeyError(f"{cls.__name__}: unknown keys {unknown}")
        kwargs = {}
        for key, name in keys.items():
            if key not in data:
                if name in cls.OPTIONAL:
                    continue
                raise KeyError(f"{cls.__name__}: no {key!r}")
            value = data[key]
            if name in cls.NESTED and value is not None:
                value = cls.NESTED[name].from_dict(value)
            elif name in cls.NESTED_LISTS:
                value = [cls.NESTED_LISTS[name].from_dict(item) for item in value]
            kwargs[name] = value
        return cls(**kwargs)


@dataclass
class DataInfo(Record):
    """The sets' sizes (sequences), the data's fingerprint (a resume must be given the same data) and how many
    sequences the sampled measurements use (seeded samples; None: not measured)."""

    forget: list[int]  # one per task
    retain: int | None
    heldout: int | None
    seq_len: int
    utility: dict[str, int] | None
    fingerprint: str
    retain_ppl_sequences: int | None  # the retain perplexity's sample
    fisher_retain_sequences: int | None  # FILA's retain Fisher's sample
    utility_ppl_sequences: dict[str, int] | None


@dataclass
class ModelInfo(Record):
    class_name: str = field(metadata={"key": "class"})
    name_or_path: str | None
    device: str
    trainable_params: int
    total_params: int
    trainable_percent: float
    fingerprint: str | None = None  # inputs.model_fingerprint of the model as given (a rerun recognizes its run)

    OPTIONAL = ("fingerprint",)


@dataclass
class Baseline(Record):
    """The metrics before unlearning; ``on_epoch``: the evaluation hook's values at epoch 0 (only with a hook)."""

    forget: list[Metrics]  # one per task
    heldout: Metrics | None
    retain_ppl: float | None
    utility_ppl: dict[str, float] | None
    on_epoch: dict[str, float | None] | None = None

    OPTIONAL = ("on_epoch",)


@dataclass
class BaselineCache(Record):
    """Where the held-out values before unlearning came from: ``hit`` (read from the cache) and its file."""

    hit: bool
    file: str


@dataclass
class DeployLog(Record):
    """deploy_quant (``engine.deploy``): the original model deployed (adapters merged, weights round-tripped
    through ``format``): its forget sets' and held-out set's MA / EL_n, the deployed criterion's limits."""

    format: str  # UnlearnConfig.deploy_quant
    weights: dict[str, int]  # {format applied: number of weight tensors}
    criterion: Criterion  # the deployed model's limits: the held-out set's deployed values (or the thresholds)
    forget: list[Metrics]  # one per task, before unlearning
    heldout: Metrics | None
    baseline_cache: BaselineCache | None  # where the deployed held-out values came from (None: not cached)
    seconds: float  # the deployed baseline's time (quantization and measurements)

    NESTED = {"baseline_cache": BaselineCache}


@dataclass
class EpochRecord(Record):
    """One epoch of a task: the update's losses (before it) and gradient norm, whether it was made, the
    measurements after it, and the seconds each took."""

    epoch: int  # 1-based, within the task
    forget_loss: float | None = None  # mean forget term over the epoch's forget units
    retain_loss: float | None = None
    forget_loss_range: list[float | None] = field(default_factory=lambda: [None, None])  # micro-batch min, max
    grad_norm: float | None = None
    updated: bool = False  # False: a non-finite loss or gradient, no update made
    train_s: float = 0.0
    forget_ma: float | None = None
    forget_el: float | None = None  # None: not measured (MA above its limit, or stop="epochs")
    retain_ppl: float | None = None
    utility_ppl: dict[str, float] | None = None
    on_epoch: dict[str, float | None] | None = None  # the evaluation hook's values (only with a hook)
    criterion_met: bool | None = None  # None: no criterion (stop="epochs"); with deploy_quant: float AND deployed
    eval_s: float = 0.0
    deploy: dict | None = None  # deploy_quant: {"ma", "el", "met"} of the deployed model (engine.deploy)

    OPTIONAL = ("on_epoch", "deploy")


@dataclass
class TaskAfter(Record):
    """Measured when a task stopped: every forget set so far (``met``: still within the criterion), the held-out
    set (its EL None unless eval_heldout_el_after), the perplexities of the task's last epoch."""

    forget: list[Metrics]  # {"ma", "el", "met"} per forget set so far
    heldout: Metrics | None
    retain_ppl: float | None
    utility_ppl: dict[str, float] | None
    deploy: dict | None = None  # deploy_quant: {"forget": [{"ma", "el", "met"}], "heldout": Metrics | None}

    OPTIONAL = ("deploy",)


@dataclass
class TaskLog(Record):
    """One forget set's unlearning; ``after`` None until it stopped and was measured (a resume skips a task
    that has it)."""

    task: int  # 0-based
    size: int  # forget sequences
    epochs: list[EpochRecord] = field(default_factory=list)
    stop_reason: str | None = None  # None: still running
    success: bool | None = None
    after: TaskAfter | None = None

    NESTED = {"after": TaskAfter}
    NESTED_LISTS = {"epochs": EpochRecord}


@dataclass
class Timings(Record):
    """Seconds per phase, added up over the sessions of a resumed run."""

    setup_s: float = 0.0
    baseline_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    export_s: float = 0.0
    total_s: float = 0.0

    def add(self, phase: str, seconds: float) -> None:
        setattr(self, phase, getattr(self, phase) + seconds)


@dataclass
class RunLog(Record):
    """The whole run (``log.json``); ``status`` "running" until the outputs are written, then "finished"."""

    status: str
    config: dict  # UnlearnConfig.to_dict()
    learning_rate: float
    data: DataInfo
    model: ModelInfo
    criterion: Criterion | None = None  # set with the baseline
    baseline: Baseline | None = None
    baseline_cache: BaselineCache | None = None  # None: the held-out cache was not used
    tasks: list[TaskLog] = field(default_factory=list)
    success: bool | None = None  # set when the run finishes
    outputs: dict[str, str] | None = None  # {what: path under out_dir}
    resumes: int = 0
    timings: Timings = field(default_factory=Timings)
    deploy: DeployLog | None = None  # deploy_quant's baseline and limits (only with deploy_quant)

    OPTIONAL = ("deploy",)
    NESTED = {"data": DataInfo, "model": ModelInfo, "baseline": Baseline, "baseline_cache": BaselineCache,
              "timings": Timings, "deploy": DeployLog}  # fmt: skip
    NESTED_LISTS = {"tasks": TaskLog}
