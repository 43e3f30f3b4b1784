"""A job's ``stages``: what a job file or Python code lists, each stage
built into its typed config (a :class:`StageSpec`).

Why a module of its own: a stage list has rules of its own, apart from the
job's other sections. Each item is a name, a ``{name: ..., <options>}``
mapping or a stage object; a stage appears once, ``shard`` is last; a stage
of one's own (``package.module:Class``) is code, kept as its options
(:class:`CustomOptions`) and not imported until the whole job has passed its
checks; and a stage that would decode every image again for a value of its
own takes it from the stage that stores the images (:func:`share_decodes`),
as the stages declare. Its names are importable from ``pipeline.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pairforge.stages.base import Stage
from pairforge.stages.options import ConfigError, build, did_you_mean, short


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: Any


@dataclass(frozen=True)
class CustomOptions:
    """The options of a stage of one's own (``package.module:Class``) as the
    job file wrote them: its module is code, imported only once the rest of
    the job has passed its checks (:func:`resolve_stages`)."""

    options: dict = field(default_factory=dict)


def stage_specs(raw: Any, problems: list[str] | None = None) -> tuple[StageSpec, ...]:
    """The job's ``stages``, each config built (``problems``: as :func:`build`).
    Each item is a stage object (``pairforge.stages.Download(...)``), a
    :class:`StageSpec`, a name, or a mapping ``{name: ..., <options>}`` as a
    job file writes it. A stage may appear once: its name keys its columns'
    owner, its ``__t_<name>`` timing column, its reject reasons (``stage``),
    its fit's folder (``_work/fit/<name>``) and its counts in the manifest,
    which two of one name would mix up."""
    from pairforge.stages import STAGES, check_custom_name, is_custom, spec_name, stage_class

    own = problems is None
    problems = [] if own else problems
    before = len(problems)
    specs: list[StageSpec | None] = []
    if not isinstance(raw, (list, tuple)) or not raw:
        problems.append(f"stages: expected a non-empty list of {{name: ..., <options>}}, got {short(raw)}")
        raw = []
    first: dict[str, int] = {}
    raw = [_as_item(item, spec_name) for item in raw]
    for i, item in enumerate(raw):
        if isinstance(item, StageSpec):  # built already (a stage object, or a job built before)
            if item.name in first:
                problems.append(f"stages[{i}]({item.name}): {item.name!r} is already stages[{first[item.name]}]; "
                                "a stage may appear once")  # fmt: skip
            first.setdefault(item.name, i)
            specs.append(item)
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(f"stages[{i}]: each stage needs a 'name', got {short(item)}")
            specs.append(None)
            continue
        name = item["name"]
        where = f"stages[{i}]({name})"
        if name in first:
            problems.append(
                f"{where}: {name!r} is already stages[{first[name]}]; a stage may appear once (its columns, "
                "reject reasons, fit folder and manifest counts are keyed by its name, so two would collide); "
                "merge their options into one"
            )
        first.setdefault(name, i)
        if is_custom(name):  # not imported here: see CustomOptions
            try:
                check_custom_name(name)
            except ValueError as e:
                problems.append(f"stages[{i}]: {e}")
                specs.append(None)
                continue
            specs.append(StageSpec(name, CustomOptions({k: v for k, v in item.items() if k != "name"})))
            continue
        try:
            if name not in STAGES and ":" not in name:
                raise ValueError(
                    f"unknown stage {name!r}{did_you_mean(name, STAGES)}; known stages: "
                    f"{', '.join(sorted(STAGES))} (or package.module:Class)"
                )
            cls = stage_class(name)
        except ValueError as e:
            problems.append(f"stages[{i}]: {e}")
            specs.append(None)
            continue
        opts = {k: v for k, v in item.items() if k != "name"}
        cfg = build(cls.Config, opts, where, problems)
        specs.append(None if cfg is None else StageSpec(name, cfg))
    names = [_item_name(item) for item in raw]
    if raw and (names[-1] != "shard" or names.count("shard") != 1):
        problems.append(f"stages: the last stage must be 'shard', and only the last; got {names}")
    if own and len(problems) > before:
        raise ConfigError("\n".join(problems))
    if len(problems) > before or any(s is None for s in specs):
        return ()
    return share_decodes(tuple(specs))


def _as_item(item: Any, spec_name) -> Any:
    """A stage object as its spec: its name and config (a run rebuilds it
    from them on every worker); anything else as it is."""
    return StageSpec(spec_name(item), item.config) if isinstance(item, Stage) else item


def _item_name(item: Any) -> str | None:
    if isinstance(item, StageSpec):
        return item.name
    return item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None


def share_decodes(specs: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """Each stage that would decode every image again for a value of its own
    (:meth:`~stages.base.Stage.wants_decoded`: ``dedup_phash``'s hash) gets
    it from the first stage before it that can compute it as it stores the
    images (:meth:`~stages.base.Stage.give_decoded`: ``download``), and
    reads it from that column (:meth:`~stages.base.Stage.take_decoded`).
    Explicit settings win: the stages say none is wanted or given where the
    job set it. A custom stage not imported yet (:class:`CustomOptions`)
    takes no part."""
    from pairforge.stages import stage_class

    def cls_of(spec: StageSpec) -> type[Stage] | None:
        if isinstance(spec.config, CustomOptions):
            return None
        try:
            return stage_class(spec.name)
        except ValueError:
            return None

    classes = [cls_of(s) for s in specs]
    out = list(specs)
    for j, cls in enumerate(classes):
        value = cls.wants_decoded(out[j].config) if cls is not None else None
        if value is None:
            continue
        for i in range(j):
            given = classes[i].give_decoded(out[i].config, value) if classes[i] is not None else None
            if given is not None:
                out[i] = StageSpec(out[i].name, given)
                out[j] = StageSpec(out[j].name, cls.take_decoded(out[j].config, value))
                break
    return tuple(out)
