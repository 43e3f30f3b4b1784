"""Stage names as written in a job file, mapped to their classes.

Classes are imported only when a job names them, so a job without the model
stages never imports torch or open_clip.
"""

from __future__ import annotations

import importlib

from pairforge.stages.base import Stage

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
