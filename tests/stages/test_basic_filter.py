import json

import numpy as np
import pytest

from pairforge.pipeline.config import ConfigError, build
from pairforge.pipeline.local import map_stage
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array
from pairforge.stages.basic_filter import BasicFilterStage, Config


def rows(captions, sizes, originals=None, **extra):
    n = len(captions)
    b = fresh_rows(
        [f"{i:04d}" for i in range(n)],
        caption=object_array(captions),
        width=np.array([s[0] for s in sizes], dtype=np.int64),
        height=np.array([s[1] for s in sizes], dtype=np.int64),
    )
    if originals is not None:
        b["original_width"] = np.array([s[0] for s in originals], dtype=np.int64)
        b["original_height"] = np.array([s[1] for s in originals], dtype=np.int64)
    b.update({k: object_array(v) for k, v in extra.items()})
    return b


def reasons(out):
    return [r if s != STATUS_OK else "ok" for s, r in zip(out["status"], out["reason"])]


def test_datacomp_defaults_each_rule_and_its_detail():
    caps = ["a dog on a couch", "two words", "a b c", "tiny cat pic here", "wide cat on grass", "tall dog", None]
    sizes = [(256, 256)] * 7
    originals = [(400, 300), (400, 300), (400, 300), (199, 800), (700, 200), (200, 601), (400, 400)]
    out = map_stage(BasicFilterStage(Config()), rows(caps, sizes, originals))
    assert reasons(out) == [
        "ok",
        "caption_too_short",
        "caption_too_short",
        "image_too_small",
        "aspect_ratio_too_large",
        "caption_too_short",
        "caption_too_short",
    ]
    d = json.loads(out["detail"][2])
    assert d == {"words": 3, "chars": 5, "min_words": 3, "min_chars": 6}  # DataComp: > 5 characters
    assert json.loads(out["detail"][4])["aspect_ratio"] == 3.5
    assert set(out["stage"][1:]) == {"basic_filter"} and out["stage"][0] == ""


def test_original_size_first_then_resized_size():
    caps = ["a dog on a couch"] * 2
    out = map_stage(BasicFilterStage(Config()), rows(caps, [(256, 256), (150, 150)], [(100, 100), (400, 400)]))
    assert reasons(out) == ["image_too_small", "ok"]
    out = map_stage(
        BasicFilterStage(Config(use_original_size=False)),
        rows(caps, [(256, 256), (150, 150)], [(100, 100), (400, 400)]),
    )
    assert reasons(out) == ["ok", "image_too_small"]
    out = map_stage(BasicFilterStage(Config()), rows(caps, [(-1, -1), (150, 600)]))  # unknown size: no verdict
    assert reasons(out) == ["ok", "image_too_small"]


def test_optional_rules_and_switching_rules_off():
    caps = ["one two three four five six", "a dog on a couch", "un chien sur un canapé"]
    cfg = Config(max_caption_words=5, languages=("en",), min_image_size=0, max_aspect_ratio=None)
    out = map_stage(BasicFilterStage(cfg), rows(caps, [(10, 90)] * 3, lang=["en", "en", "fr"]))
    assert reasons(out) == ["caption_too_long", "ok", "caption_language"]
    out = map_stage(BasicFilterStage(Config(languages=("en",), min_image_size=0)), rows(caps[:1], [(10, 10)]))
    assert reasons(out) == ["caption_language"]  # no language column: not known to be English


def test_rows_already_rejected_are_left_alone():
    b = rows(["no", "a dog on a couch"], [(300, 300)] * 2)
    b["status"][0], b["stage"][0], b["reason"][0] = "failed", "download", "http_404"
    out = map_stage(BasicFilterStage(Config()), b)
    assert list(out["reason"]) == ["http_404", ""] and list(out["stage"]) == ["download", ""]


def test_config_from_a_job_file_checks_values():
    assert build(Config, {"min_caption_words": 2, "max_aspect_ratio": 4}, "x").max_aspect_ratio == 4.0
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        build(Config, {"max_aspect_ratio": 0.5}, "x")
    with pytest.raises(ConfigError, match="unknown key"):
        build(Config, {"min_words": 2}, "x")
