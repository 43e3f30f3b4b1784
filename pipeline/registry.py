"""Stage names as written in a job file, mapped to their classes.

Classes are imported only when a job names them, so a job without the model
stages never imports torch or open_clip.

A stage of one's own is named ``package.module:Class``. Importing it runs
its module's code, on the driver and on every Ray worker: a job file that
names one is code, to be trusted as such (docs/security.md). The job loader
only checks that such a name is a module path and a class name; the module
is imported by :func:`resolve_stages` once the rest of the job has passed
the whole-job check (``pipeline.checks``), so a job that is wrong anywhere
else imports nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

from pairforge.stages.base import Stage

#: ``package.module:Class``: dotted identifiers, one colon, an identifier
CUSTOM_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")

STAGES: dict[str, str] = {
    "download": "pairforge.stages.download:DownloadStage",
    "basic_filter": "pairforge.stages.basic_filter:BasicFilterStage",
    "language": "pairforge.stages.language:LanguageStage",
    "safety": "pairforge.stages.safety:SafetyStage",
    "dedup_exact": "pairforge.stages.dedup_exact:ExactDedupStage",
    "dedup_phash": "pairforge.stages.dedup_phash:PerceptualDedupStage",
    "dedup_semantic": "pairforge.stages.dedup_semantic:SemanticDedupStage",
    "clip_score": "pairforge.stages.clip_score:ClipScoreStage",
    "heads": "pairforge.stages.heads:HeadsStage",
    "regions": "pairforge.stages.regions:RegionsStage",
    "confounders": "pairforge.stages.confounders:ConfounderStage",
    "metadata_match": "pairforge.stages.metadata_match:MetadataMatchStage",
    "balance": "pairforge.stages.balance:BalanceStage",
    "align_text": "pairforge.stages.align_text:AlignTextStage",
    "shard": "pairforge.stages.shard:ShardStage",
}


def stage_class(name: str) -> type[Stage]:
    """A built-in stage by name, or a stage of your own as ``package.module:Class``
    (importable on every Ray worker)."""
    target = STAGES.get(name) or (name if ":" in name else None)
    if target is None:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))} (or module:Class)")
    module, cls = target.split(":", 1)
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"stage {name!r}: cannot import {cls} from {module}: {e}") from None
    if not (isinstance(found, type) and issubclass(found, Stage)):
        raise ValueError(f"stage {name!r}: {target} is not a Stage class")
    return found


def is_custom(name: str) -> bool:
    """A stage of one's own (``module:Class``), not a built-in one."""
    return name not in STAGES and ":" in str(name)


def check_custom_name(name: str) -> None:
    """A custom stage's name, checked without importing anything."""
    if not CUSTOM_NAME.fullmatch(name):
        raise ValueError(f"stage {name!r}: a stage of your own is named package.module:Class")


def resolve_stages(job):
    """``job`` with each custom stage's module imported and its options built
    into its ``Config`` (``pipeline.config.CustomOptions`` until then); a
    ``ConfigError`` naming ``stages[i]`` when one cannot be. Built-in stages
    are as they were."""
    from pairforge.pipeline.config import ConfigError, CustomOptions, StageSpec, build

    specs = list(job.stages)
    for i, spec in enumerate(specs):
        if not isinstance(spec.config, CustomOptions):
            continue
        try:
            cls = stage_class(spec.name)
        except ValueError as e:
            raise ConfigError(f"stages[{i}]: {e}") from None
        specs[i] = StageSpec(spec.name, build(cls.Config, dict(spec.config.options), f"stages[{i}]({spec.name})"))
    return dataclasses.replace(job, stages=tuple(specs)) if specs != list(job.stages) else job
