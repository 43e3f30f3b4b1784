"""The stage contract shared by every stage and by both runners.

A *batch* is a ``dict[str, numpy.ndarray]`` of equal-length columns (Ray Data's
``batch_format="numpy"``). Strings and bytes are object arrays; fixed-size
vectors (embeddings) are 2-D arrays; ragged per-row arrays (K x 4 boxes,
K x D region features, K may be 0) are object arrays of ndarrays.

Every row carries its identity and fate from the URL list to the output:

* ``key``      stable id, ``{shard_id:05d}{index}`` like img2dataset
* ``shard_id`` the input/output shard the row belongs to
* ``status``   ``ok`` while the row is alive, else ``failed`` (could not be
  fetched or decoded) or ``dropped`` (a filter or dedup decided against it);
  the shard writer writes it in img2dataset's words (``success``,
  ``failed_to_download``, ...; ``manifests.shards.written_status``)
* ``stage`` / ``reason`` / ``detail``  which stage rejected it, why (a short
  machine-readable reason) and the values behind the decision (JSON)

Each stage *declares* the columns it adds (:meth:`Stage.outputs`, a tuple of
:class:`Column`): its kind, dtype, shape and the value rows get that the
stage never saw; and the columns it reads that others must provide
(:meth:`Stage.inputs`), which ``pipeline.checks`` holds against the URL list
and the earlier stages' outputs before a run starts. The shard writer, the rejects, the embeddings files and the
manifest route a column by its declared kind, never by its name or ``ndim``.

Stages never import ``ray`` and never import each other. A stage sees only the
rows that are still ``ok``; :func:`run_stage_batch` passes the others through.
How a stage runs (tasks, an actor pool, in process) and how a global stage's
fit is spread over tasks is the runner's business (``pipeline/``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np

from pairforge.stages.batch import (  # noqa: F401 - the helpers are part of what stages import from here
    STATUS_DROPPED,
    STATUS_FAILED,
    STATUS_OK,
    Batch,
    batch_len,
    concat,
    fresh_rows,
    object_array,
    ok_mask,
    reject,
    take,
)
from pairforge.stages.options import ConfigError, build, field_error
from pairforge.stages.options_doc import options_text

#: Columns every row has from the reader on.
IDENTITY_COLUMNS = ("key", "shard_id", "status", "stage", "reason", "detail")
#: the ``stage`` of a row the reader rejected (a bound of ``pipeline.inputlimits``)
READ_STAGE = "input"
#: Column holding encoded image bytes (its extension is in ``image_ext``);
#: never written to parquet or rejects.
IMAGE_COLUMN = "image"
#: Prefix of per-stage timing columns (seconds of batch work per row).
TIMING_PREFIX = "__t_"
#: columns a stage's ``cpu_prepare`` hands to its ``process_batch``; never written
SCRATCH_PREFIX = "__pf_"

#: Column kinds. ``scalar``: a number or bool per row; ``string``; ``bytes``
#: (a tar member, never in parquet); ``vector``: a fixed ``shape`` per row
#: (an embedding); ``ragged``: ``(K, *shape)`` per row, K varying (may be 0).
KINDS = ("scalar", "string", "bytes", "vector", "ragged")
#: Where a ``vector`` column is written: ``parquet`` (a fixed-size list
#: column) or ``embeddings`` (``OUT/embeddings/<col>/<col>_S.npy``, float16,
#: clip-retrieval's layout; not in the parquet).
VECTOR_STORES = ("parquet", "embeddings")
#: Where a ``ragged`` column is written: ``parquet`` (a list column) or
#: ``arrays`` (``OUT/arrays/<col>/<col>_S.npy``: the rows' arrays concatenated
#: in the order of ``shards/S.parquet``, with ``<col>_S.offsets.npy``; for
#: region features, too wide for a parquet list). Either may also go in the tar.
RAGGED_STORES = ("parquet", "arrays")


@dataclass(frozen=True)
class Column:
    """One column a stage adds: what it holds and what a row it never saw gets."""

    name: str
    kind: str
    dtype: str = "float32"
    #: ``vector``: the per-row shape, e.g. ``(512,)``; ``ragged``: the shape of
    #: one element, e.g. ``(4,)`` for K x 4 boxes or ``()`` for K labels
    shape: tuple[int, ...] = ()
    #: the value of rows the stage did not process (scalars and strings);
    #: vectors default to zeros, ragged columns to K = 0, bytes to ``None``
    default: Any = None
    #: ``vector``: see :data:`VECTOR_STORES`; ``ragged``: see :data:`RAGGED_STORES`
    store: str = "parquet"
    #: ``ragged`` only: also write each row's array into the tar as ``{key}.{name}.npy``
    in_tar: bool = True
    #: ``scalar`` only: the manifest counts it (rows with a value, their sum,
    #: min, max, and how many are above 0) over every row of the run, kept or not
    summary: bool = False
    #: ``string`` only: ``""`` (or ``None``) means "no value" and is written as null
    #: (parquet, the tar's ``{key}.json``), e.g. ``duplicate_of`` on a kept row
    nullable: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        stores = RAGGED_STORES if self.kind == "ragged" else VECTOR_STORES
        if self.store not in stores:
            raise ValueError(f"column {self.name!r}: store {self.store!r} is not one of {stores}")
        if self.summary and self.kind != "scalar":
            raise ValueError(f"column {self.name!r}: only a scalar column can have a summary")
        if self.kind == "vector" and len(self.shape) != 1:
            raise ValueError(f"column {self.name!r}: a vector needs shape (dim,), got {self.shape}")
        if self.nullable and self.kind != "string":
            raise ValueError(f"column {self.name!r}: only a string column is nullable, not a {self.kind}")

    def defaults(self, n: int) -> np.ndarray:
        """A column of ``n`` rows the stage never saw."""
        if self.kind == "scalar":
            return np.full(n, self.default if self.default is not None else 0, dtype=self.dtype)
        if self.kind == "string":
            return object_array([self.default if self.default is not None else ""] * n)
        if self.kind == "bytes":
            return object_array([None] * n)
        if self.kind == "vector":
            return np.zeros((n, *self.shape), dtype=self.dtype)
        empty = np.zeros((0, *self.shape), dtype=self.dtype)
        return object_array([empty] * n)

    def conform(self, values) -> np.ndarray:
        """``values`` as this column's in-memory form (typed, shaped)."""
        if self.kind == "scalar":
            return np.asarray(values, dtype=self.dtype)
        if self.kind in ("string", "bytes"):
            return values if isinstance(values, np.ndarray) and values.dtype == object else object_array(list(values))
        if self.kind == "vector":
            v = np.asarray(values, dtype=self.dtype) if len(values) else np.zeros((0, *self.shape), self.dtype)
            if v.ndim == 1 and len(v) and v.dtype == object:
                v = np.stack([np.asarray(x, dtype=self.dtype) for x in values])
            return v.reshape(len(values), *self.shape)
        return object_array([np.asarray(x, dtype=self.dtype).reshape(-1, *self.shape) for x in values])

    def to_json(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.kind in ("scalar", "vector", "ragged"):
            d["dtype"] = self.dtype
        if self.kind in ("vector", "ragged"):
            d["shape"] = list(self.shape)
        if self.kind == "vector" or (self.kind == "ragged" and self.store != "parquet"):
            d["store"] = self.store
        if self.kind in ("scalar", "string") and self.default is not None:
            d["default"] = self.default.item() if isinstance(self.default, np.generic) else self.default
        if self.nullable:
            d["nullable"] = True
        return d


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. Declared by the stage, read by the
    Ray adapter; never guessed from the driver's hardware."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    #: actors in the pool for stages that run on actors (min, max); ignored for tasks
    concurrency: tuple[int, int] = (1, 1)
    #: batches one actor works on at once, on threads of its own (Ray Data's true
    #: multi-threading: the stage must be thread-safe); ignored for tasks
    actor_calls: int = 1
    #: bytes of memory one ``cpu_prepare`` task needs (its Ray ``memory`` request,
    #: capped at the cluster's memory per CPU); ``None``: no request
    prepare_memory: int | None = None


class _StageType(type):
    """Calling a stage class takes its ``Config``, a mapping of options, or the
    options as keywords (``Download(image_size=128)``), checked as a job
    file's are (:meth:`Stage.configure`); the class docstring lists them."""

    def __init__(cls, name, bases, ns, **kw):
        super().__init__(name, bases, ns, **kw)
        config = ns.get("Config")
        if config is not None and is_dataclass(config):
            own = inspect.cleandoc(ns.get("__doc__") or f"The ``{ns.get('name') or name}`` stage.")
            cls.__doc__ = "\n\n".join(p for p in (own, options_text(config)) if p)

    def __call__(cls, config=None, /, **options):
        config = cls.configure(config, **options)
        try:
            return super().__call__(config)
        except ValueError as e:  # a check in the stage's constructor: named as the config's are
            if isinstance(e, ConfigError) or cls.Config is None:
                raise
            raise field_error(cls.name or cls.__name__, e, [f.name for f in fields(cls.Config)]) from e


class Stage(metaclass=_StageType):
    """A per-row stage: ``process_batch`` maps a batch of ok rows to a batch of
    the same rows (same order, same length), adding its declared
    :meth:`outputs` and possibly marking rows failed/dropped with :func:`reject`.

    ``setup`` runs once per worker process, before the first batch; the
    runner owns that (an actor calls it when it starts, a task process on its
    first batch of this stage, the in-process runner once per run).

    A stage is made from its config alone (``Stage(config)``, or the
    options as keywords): the runners rebuild it from its name and config.
    """

    name: ClassVar[str] = ""
    #: the stage's options, a frozen dataclass (``stages.options.options``)
    Config: ClassVar[type | None] = None
    #: ``True`` when ``setup`` loads heavy state (a model): the Ray runner
    #: keeps it in a pool of actors sized by :meth:`resources`
    runs_on_actors: ClassVar[bool] = False
    #: the names of the columns this stage can add, for a stage that is not
    #: built cheaply from its defaults (an option without one, a file read when
    #: built); ``None``: those of the stage built from its defaults. The job
    #: check names the stage that makes a column a job lacks from these
    #: (:meth:`column_names`), without building it
    declares_columns: ClassVar[tuple[str, ...] | None] = None
    #: the options naming open_clip weights, ``(model, pretrained)``: the job
    #: check resolves them against open_clip's registries and this machine's
    #: caches before a run (``pipeline.checks.check_open_clip``); ``None``: none
    open_clip_options: ClassVar[tuple[str, str] | None] = None

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def column_names(cls) -> tuple[str, ...]:
        """The columns this stage can add: :attr:`declares_columns`, else the
        outputs of the stage built from its defaults; none when it cannot be."""
        if cls.declares_columns is not None:
            return tuple(cls.declares_columns)
        try:
            return tuple(c.name for c in cls().outputs())
        except (ValueError, TypeError):  # ConfigError too: an option without a default
            return ()

    @classmethod
    def wants_decoded(cls, config: Any) -> str | None:
        """A value this stage, as ``config`` sets it, would compute from each
        image's decoded pixels that the stage storing the images can compute
        while it has them decoded anyway (a perceptual hash: ``phash``),
        sparing a decode pass of this stage's own. The job loader offers it to
        the stages before this one (:meth:`give_decoded`, the first that takes
        it computes it) and then sets this one to read it
        (:meth:`take_decoded`). Default: none; also none where the job says
        where it comes from already."""
        return None

    @classmethod
    def take_decoded(cls, config: Any, value: str) -> Any:
        """``config`` reading ``value`` (:meth:`wants_decoded`) from the
        column of that name, which an earlier stage fills. Default: ``config``."""
        return config

    @classmethod
    def give_decoded(cls, config: Any, value: str) -> Any | None:
        """``config`` also computing ``value`` (another stage's
        :meth:`wants_decoded`) into the column of that name as it stores each
        image, for the stages after it; ``None`` when it cannot (it stores no
        images, or computes another such value already). Default: ``None``."""
        return None

    @classmethod
    def configure(cls, config: Any = None, /, **options) -> Any:
        """The stage's config from a ``Config``, a mapping, or keyword options
        (these override the first's), checked with a job file's messages:
        ``download.retries: expected >= 0, got -3``."""
        if cls.Config is None or (config is not None and not options and not isinstance(config, Mapping)):
            if options:
                raise ConfigError(f"{cls.name or cls.__name__}: takes no options, got {sorted(options)}")
            return config
        if config is None:
            values = {}
        elif isinstance(config, Mapping):
            values = dict(config)
        elif isinstance(config, cls.Config):
            values = {f.name: getattr(config, f.name) for f in fields(config)}
        else:
            raise ConfigError(f"{cls.name or cls.__name__}: expected its Config or a mapping, got {config!r}")
        return build(cls.Config, {**values, **options}, cls.name or cls.__name__)

    def resources(self) -> Resources:
        return Resources()

    def outputs(self) -> tuple[Column, ...]:
        """The columns this stage adds, with their kinds and defaults."""
        return ()

    def inputs(self) -> tuple[str, ...]:
        """The columns this stage reads that an earlier stage or the URL list
        must provide (``pipeline.checks`` refuses a job where none does).
        Default: a fitted global stage's ``fit_columns``, else none."""
        if isinstance(self, GlobalStage) and self.needs_fit():
            return tuple(self.fit_columns)
        return ()

    def services(self) -> dict[str, Any]:
        """Run-wide services this stage uses, by name, with what the runner
        needs to make them: ``{"host_gate": Limits(...)}`` (one
        :class:`~stages.common.hostgate.HostGate` for the whole run, shared by
        every task on every node) and ``{"work_store": "folder"}`` (a store of
        small files under the run's work folder: ``read(name)``,
        ``write(name, data)``). The runner makes each once per run and hands
        it over with :meth:`attach` before the first batch. Default: none."""
        return {}

    def attach(self, name: str, service: Any) -> None:
        """Take the run's service ``name`` (see :meth:`services`); it travels
        with the stage to its workers, so it must pickle (the runners'
        services do). Without one, a stage makes its own per process."""
        self.__dict__.setdefault("attached", {})[name] = service

    def retry_later(self, reason: str) -> bool:
        """Whether a row this stage failed with ``reason`` gets one more try
        at the end of the per-row pass (the download stage's transient
        failures). Such rows go through every per-row stage again, as
        :meth:`for_retry` gives them. Default: never."""
        return False

    def for_retry(self) -> Stage:
        """This stage as the deferred retry pass runs it. Default: itself."""
        return self

    def check(self, declared: dict[str, Column]) -> list[str]:
        """What would stop this stage on a worker and can be seen on the
        driver before Ray starts: a model file or package missing, a head
        whose input does not fit the embedding an earlier stage declares.
        One line each, starting with the option it is about (``nsfw_model:
        ...``); ``pipeline.checks`` puts the stage's place in front.
        ``declared``: the columns the stages before this one declare. Must
        not load a model or import a heavy package. Default: nothing."""
        return []

    def setup(self) -> None:
        """Load heavy state once per worker (models, clients)."""

    def teardown(self) -> None:
        """Release what ``setup`` took."""

    def cpu_prepare(self, batch: Batch) -> Batch:
        """Optional CPU work that needs none of ``setup``'s state (decoding,
        tokenising), for a stage on actors: the Ray plan runs it in plain CPU
        tasks ahead of the actor pool, so the actors (one per GPU share)
        keep to the accelerator. It adds columns named ``SCRATCH_PREFIX*``
        for ``process_batch`` to read; they are dropped after it. Rows in any
        status reach it and it must not fail on them. Default: nothing."""
        return batch

    def has_cpu_prepare(self) -> bool:
        return type(self).cpu_prepare is not Stage.cpu_prepare

    def process_batch(self, batch: Batch) -> Batch:
        raise NotImplementedError


@dataclass
class FitResult:
    """What a global stage's fit decides, as data.

    ``decisions``: a batch with ``key``, ``reason`` (``""``: the row stays,
    only columns are set), ``detail`` (JSON or dict), optionally ``survivor``
    (bool: this kept row represents dropped duplicates), and any of the stage's
    declared output columns to set on those rows. ``tables``: side tables,
    name -> rows (see :meth:`GlobalStage.side_tables`). ``counters``: named
    counts (rows per kind, skips per reason) the manifest sums under the fit.
    """

    decisions: Batch = field(default_factory=dict)
    tables: dict[str, Batch] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


class GlobalStage(Stage):
    """A stage whose decision needs the whole dataset (dedup, top-fraction,
    confounders). Its per-row part is ``process_batch``; its fit is a small
    map-reduce over the ``fit_columns`` of the rows still alive at its place
    in the stage list (never their images), each step a pure method, so the
    runners can spread it over tasks:

    1. ``learn(sample)``: optional, when ``sample_rows`` > 0: fit state on a
       sample of rows chosen by a hash of their key (k-means centroids, a
       score window). Small state travels with the stage to every later
       step; arrays that grow with the data (centroids) are
       ``learned_arrays``: the fit writes them to the work folder after
       ``learn`` and each task reads them back (``use_learned``), so no
       task argument grows with the dataset.
    2. ``bucket_rows(rows)``: per input shard, rows with an int ``bucket``
       column; rows sharing a bucket meet in one ``reduce_bucket`` call.
    3. ``reduce_bucket(rows)``: per bucket, a small result (pairs, counts).
    4. ``combine(reduced)``: all reduced rows -> a :class:`FitResult`; it may
       also keep a rule on the stage (a score cut) for step 5.
    5. ``decide_rows(rows)``: optional, per input shard after ``combine``:
       decisions from that rule for the shard's alive rows.

    Decisions are stored partitioned by shard and joined by each shard's own
    writer; nothing per row goes through the driver.
    """

    fit_columns: ClassVar[tuple[str, ...]] = ("key",)
    #: rows of the hash sample ``learn`` gets; 0: no ``learn`` step
    sample_rows: ClassVar[int] = 0

    def needs_fit(self) -> bool:
        """Whether this configuration needs the global pass at all (a
        threshold-only clip_score does not). Default: yes."""
        return True

    def learn(self, sample: Batch) -> None:
        """Fit state on a sample of alive fit rows (see the class doc)."""

    def learned_arrays(self) -> dict[str, np.ndarray]:
        """The arrays ``learn`` fitted that grow with the data, by name
        (``[A-Za-z0-9_]``): written to the work folder (``.npy``, no
        pickle), then dropped from the stage. Default: none."""
        return {}

    def use_learned(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Hold the arrays ``learned_arrays`` gave (read back in a task), or
        drop them (``None``) before the stage travels."""

    def bucket_rows(self, rows: Batch) -> Batch:
        raise NotImplementedError

    def reduce_bucket(self, rows: Batch) -> Batch:
        raise NotImplementedError

    def combine(self, reduced: Batch) -> FitResult:
        raise NotImplementedError

    def has_decide_rows(self) -> bool:
        return type(self).decide_rows is not GlobalStage.decide_rows

    def decide_rows(self, rows: Batch) -> FitResult:
        """Per shard, after ``combine`` (see the class doc). Default: nothing."""
        return FitResult()

    def side_tables(self) -> dict[str, tuple[str, ...]]:
        """Side tables this stage writes: name (a folder under ``OUT``) ->
        the columns holding keys of shard rows (``manifest verify`` checks
        that every such key is in the shards). The first names the row a
        table row belongs to."""
        return {}


def require(ok: bool, field: str, value, expected: str) -> None:
    """A config check (``__post_init__``) that names the field and the value:
    ``ValueError("retries: expected >= 0, got -3")``; the job loader puts the
    key path in front (``stages[0](download).retries: ...``)."""
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


# ------------------------------------------------------------ running a stage


def run_stage_batch(stage: Stage, batch: Batch) -> Batch:
    """Apply ``stage`` to the ok rows of ``batch``; other rows pass through
    with the stage's declared columns set to their defaults. Row order is
    kept. Also records the stage's time per row in ``__t_<stage>``."""
    n = batch_len(batch)
    t0 = time.perf_counter()
    ok = ok_mask(batch) if n else np.zeros(0, dtype=bool)
    cols = stage.outputs()
    if ok.all():
        out = _process(stage, dict(batch)) if n else dict(batch)
    elif not ok.any():
        out = dict(batch)
    else:
        done = _process(stage, take(batch, np.flatnonzero(ok)))
        rest = take(batch, np.flatnonzero(~ok))
        out = _merge(done, rest, ok, cols)
    for c in cols:
        out[c.name] = c.conform(out[c.name]) if c.name in out else c.defaults(n)
    for col in [c for c in out if c.startswith(SCRATCH_PREFIX)]:
        del out[col]
    dt = time.perf_counter() - t0
    out[TIMING_PREFIX + stage.name] = np.full(n, dt / max(n, 1), dtype=np.float64)
    return out


class StageError(RuntimeError):
    """A stage raised instead of rejecting a row: names the stage and the
    first row that fails alone (``key`` is ``None`` when none does)."""

    def __init__(self, stage: str, key, error: str, trace: str = ""):
        super().__init__(stage, key, error, trace)
        self.stage, self.key, self.error, self.trace = stage, key, error, trace

    def __str__(self) -> str:
        where = f"row {self.key}" if self.key is not None else "a batch (no single row fails alone)"
        return f"stage {self.stage} failed on {where}: {self.error}"


def _process(stage: Stage, batch: Batch) -> Batch:
    try:
        return stage.process_batch(batch)
    except Exception as e:  # noqa: BLE001 - reported with the row that causes it
        import traceback

        trace = traceback.format_exc()
        key = None
        for i in range(batch_len(batch)):  # only on failure: find the row that fails alone
            try:
                stage.process_batch(take(batch, np.array([i])))
            except Exception:  # noqa: BLE001
                key = str(batch["key"][i])
                break
        raise StageError(stage.name, key, f"{type(e).__name__}: {e}", trace) from e


def _merge(done: Batch, rest: Batch, ok: np.ndarray, columns: tuple[Column, ...]) -> Batch:
    n = len(ok)
    declared = {c.name: c for c in columns}
    out: Batch = {}
    ok_idx, rest_idx = np.flatnonzero(ok), np.flatnonzero(~ok)
    for col, dv in done.items():
        rv = rest.get(col)
        if col in declared:
            c = declared[col]
            dv = c.conform(dv)
            rv = c.defaults(len(rest_idx)) if rv is None else c.conform(rv)
        elif rv is None:
            rv = object_array([None] * len(rest_idx))
        if dv.dtype != object and rv.dtype != object and dv.shape[1:] == rv.shape[1:]:
            col_out = np.empty((n,) + dv.shape[1:], dtype=np.result_type(dv.dtype, rv.dtype))
        else:
            col_out = np.empty(n, dtype=object)
            dv, rv = object_array(list(dv)), object_array(list(rv))
        col_out[ok_idx] = dv
        col_out[rest_idx] = rv
        out[col] = col_out
    return out


def stage_columns(stages) -> dict[str, tuple[str, Column]]:
    """Every declared column of ``stages`` -> (the stage that adds it, its
    declaration). A column declared twice keeps its first declaration."""
    out: dict[str, tuple[str, Column]] = {}
    for st in stages:
        for c in st.outputs():
            out.setdefault(c.name, (st.name, c))
    return out
