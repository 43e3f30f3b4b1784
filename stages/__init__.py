"""The stages: one a module, each a small class with a frozen ``Config``.

A job file names a stage by its name (``download``, ``clip_score``); Python
code uses its class, under a name made from it: ``pairforge.stages.Download``,
``pairforge.stages.ClipScore`` ... Calling one takes the options as keywords,
a mapping or its ``Config`` (``Download(image_size=128)``), checked as a job
file's are. A stage of your own is ``package.module:Class`` in a job file.

Stage modules are imported only when named, so ``import pairforge.stages``
imports neither torch nor ray, and a job without the model stages never
imports torch.
"""

from __future__ import annotations

import importlib
import re

#: the built-in stages: name in a job file -> ``module:Class``
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


def class_name(name: str) -> str:
    """The Python name of built-in stage ``name``: ``clip_score`` -> ``ClipScore``."""
    return "".join(part.title() for part in name.split("_"))


_BY_CLASS_NAME = {class_name(n): n for n in STAGES}
__all__ = ["STAGES", "class_name", "spec_name", "stage_class", *_BY_CLASS_NAME]


def stage_class(name: str) -> type:
    """A built-in stage by name, or a stage of your own as ``package.module:Class``
    (importable on every Ray worker)."""
    from pairforge.stages.base import Stage

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


#: ``package.module:Class``: dotted identifiers, one colon, an identifier
CUSTOM_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_custom(name: str) -> bool:
    """A stage of one's own (``module:Class``), not a built-in one. Its module
    is code: imported only once the rest of the job passed its checks."""
    return name not in STAGES and ":" in str(name)


def check_custom_name(name: str) -> None:
    """A custom stage's name, checked without importing anything."""
    if not CUSTOM_NAME.fullmatch(name):
        raise ValueError(f"stage {name!r}: a stage of your own is named package.module:Class")


def spec_name(stage) -> str:
    """How a job names ``stage`` (an instance): its built-in name, else
    ``module:Class``."""
    cls = type(stage)
    if STAGES.get(stage.name) == f"{cls.__module__}:{cls.__qualname__}":
        return stage.name
    return f"{cls.__module__}:{cls.__qualname__}"


def __getattr__(attr: str):
    name = _BY_CLASS_NAME.get(attr)
    if name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    cls = globals()[attr] = stage_class(name)
    return cls


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BY_CLASS_NAME))
