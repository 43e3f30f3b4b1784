"""The stage contract shared by every stage and by both runners.

A stage is a class with a frozen ``Config`` that maps a batch of rows to the
same rows with the columns it declares added (:class:`Stage`); a global stage
(:class:`GlobalStage`) also decides over the whole dataset in a small
map-reduce whose steps hand each other data (:class:`Learned`,
:class:`FitResult`, :mod:`stages.fitting`). What rows and columns
are (the identity columns, :class:`Column`, :class:`Resources`) is
:mod:`stages.declarations`; how a stage is applied to a batch
(:func:`run_stage_batch`) is :mod:`stages.per_row`; the batch helpers are
:mod:`stages.batch`. All of them are importable from here, the one module a
stage of one's own needs.

Each stage *declares* the columns it adds (:meth:`Stage.outputs`) and the
columns it reads that others must provide (:meth:`Stage.inputs`), which
``pipeline.checks`` holds against the URL list and the earlier stages'
outputs before a run starts; and what else ``pipeline/`` must know of it
(:attr:`Stage.declares_columns`, :attr:`Stage.open_clip_options`,
:meth:`Stage.wants_decoded`, :meth:`Stage.check`), so that ``pipeline/``
names no stage. What a runner must know to run a stage is declared as data
(:meth:`Stage.resources`, :attr:`GlobalStage.link_columns`, a fit's
``FitResult.rule``): no runner asks whether a method was overridden.

Stages never import ``ray`` and never import each other. A stage sees only the
rows that are still ``ok``; :func:`run_stage_batch` passes the others through.
How a stage runs (tasks, an actor pool, in process) and how a global stage's
fit is spread over tasks is the runner's business (``pipeline/``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar

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
from pairforge.stages.declarations import (  # noqa: F401 - as the batch helpers
    IDENTITY_COLUMNS,
    IMAGE_COLUMN,
    KINDS,
    RAGGED_STORES,
    READ_STAGE,
    SCRATCH_PREFIX,
    TIMING_PREFIX,
    VECTOR_STORES,
    Column,
    Resources,
    stage_columns,
)
from pairforge.stages.fitting import FitResult, Learned  # noqa: F401 - the fit's data, part of the contract
from pairforge.stages.options import ConfigError, build, field_error
from pairforge.stages.options_doc import options_text
from pairforge.stages.per_row import StageError, run_stage_batch  # noqa: F401 - as the batch helpers


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
    #: what to do about a reject reason of this stage that ends many runs:
    #: reason -> one line of advice, which a run's last line gives when that
    #: reason leads a run that rejected most of its rows (``pipeline.outcome``)
    reject_advice: ClassVar[dict[str, str]] = {}

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

    def input_warnings(self, rows: Batch, where: str) -> list[str]:
        """Warnings about the URL lists, from their first rows (as the
        reader wrote them: ``url``, ``caption``, the identity columns, any
        other column of the lists), on the driver before the run: what will
        make many rows fail at this stage and which option would change it
        (``download``: addresses it refuses and the ``allow_networks`` that
        admits them). ``where``: this stage's place in the job
        (``stages[0](download)``), for the option a line names. No network
        request, no model. Default: none."""
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
        status reach it and it must not fail on them. The runners call it only
        where :meth:`resources` says so (``Resources.cpu_prepare``).
        Default: nothing."""
        return batch

    def process_batch(self, batch: Batch) -> Batch:
        raise NotImplementedError


class GlobalStage(Stage):
    """A stage whose decision needs the whole dataset (dedup, top-fraction,
    confounders). Its per-row part is ``process_batch``; its fit is a small
    map-reduce over the ``fit_columns`` of the rows still alive at its place
    in the stage list (never their images). Each step is a method that takes
    what the steps before it returned and changes nothing on the stage, so
    the runners can spread the steps over tasks:

    1. ``learn(sample) -> Learned``: only when ``sample_rows`` > 0, on a
       sample of that many rows chosen by a hash of their key, in key order
       (k-means centroids, a score window).
    2. ``bucket_rows(rows, learned)``: per input shard, rows with an int
       ``bucket`` column; rows sharing a bucket meet in one ``reduce_bucket``.
    3. ``reduce_bucket(rows, learned)``: per bucket, a small result (pairs, counts).
    4. ``combine(reduced, learned) -> FitResult``: all reduced rows ->
       decisions, side tables, counters, and optionally a ``rule``.
    5. ``decide_rows(rows, rule) -> FitResult``: only when ``combine``
       returned a rule, per input shard: decisions for the shard's alive
       rows by that rule (a score cut), so no decision list for the whole
       dataset is made in one place.

    ``learned`` is ``Learned()`` (empty) when the stage has no ``learn`` step.
    A stage whose ``combine`` merges links between rows into clusters and
    decides each cluster on its own (dedup) declares ``link_columns``; then
    ``combine`` runs once per partition of whole connected components, never
    over every reduced row at once.

    Decisions are stored partitioned by shard and joined by each shard's own
    writer; nothing per row goes through the driver.
    """

    #: the columns of the alive rows the fit reads (``key`` among them); a stage
    #: whose columns follow its options sets them from its config when built
    fit_columns: tuple[str, ...] = ("key",)
    #: rows of the hash sample ``learn`` gets; 0: no ``learn`` step. Like
    #: ``fit_columns``, data: set from the config when built where it depends on it
    sample_rows: int = 0
    #: two columns of the reduced rows holding row keys that each reduced row
    #: links (the same key twice: it links none). Rows whose keys are connected,
    #: directly or through other rows, form a *component*. Declaring them
    #: promises that ``combine`` decides each component on its own (the
    #: decisions of a component's keys depend only on its reduced rows), returns
    #: no rule and the stage writes no side tables: the fit may then run
    #: ``combine`` once per partition of whole components
    #: (``pipeline.components``). ``None``: ``combine`` sees every reduced row.
    link_columns: ClassVar[tuple[str, str] | None] = None

    def needs_fit(self) -> bool:
        """Whether this configuration needs the global pass at all (a
        threshold-only clip_score does not). Default: yes."""
        return True

    def learn(self, sample: Batch) -> Learned:
        """What the later steps need from a sample of the alive fit rows
        (see the class doc). Default: nothing."""
        return Learned()

    def bucket_rows(self, rows: Batch, learned: Learned) -> Batch:
        raise NotImplementedError

    def reduce_bucket(self, rows: Batch, learned: Learned) -> Batch:
        raise NotImplementedError

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        raise NotImplementedError

    def decide_rows(self, rows: Batch, rule: Learned) -> FitResult:
        """Per shard, when ``combine`` returned a ``rule`` (see the class doc)."""
        raise NotImplementedError(f"{self.name}: combine returned a rule, but the stage has no decide_rows")

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
