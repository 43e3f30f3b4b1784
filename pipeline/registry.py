"""Stage names as written in a job file, mapped to their classes.

Classes are imported only when a job names them, so a job without the model
stages never imports torch or open_clip.
"""

from __future__ import annotations

import importlib

from stages.base import Stage

STAGES: dict[str, str] = {
    "download": "stages.download:DownloadStage",
    "basic_filter": "stages.basic_filter:BasicFilterStage",
    "dedup_exact": "stages.dedup_exact:ExactDedupStage",
    "dedup_phash": "stages.dedup_phash:PerceptualDedupStage",
    "dedup_semantic": "stages.dedup_semantic:SemanticDedupStage",
    "clip_score": "stages.clip_score:ClipScoreStage",
    "shard": "stages.shard:ShardStage",
}


def stage_class(name: str) -> type[Stage]:
    try:
        target = STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
