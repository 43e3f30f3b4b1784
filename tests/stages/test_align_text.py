"""align_text: ALIGN's caption-frequency, rare-token and unigram rules on a
corpus with planted boilerplate: "image", "IMG_2041.JPG" and "click to
enlarge" shared by 50 images each are dropped as ``caption_shared``, a
caption shared by 3 images is kept; the fit runs as the runners run it, over
in-memory shards (``tests/stages/test_balance.py``'s ``fit``)."""

import json
from collections import Counter

import numpy as np
import pytest

from pairforge.stages.align_text import AlignTextStage, Config, caption_form
from pairforge.stages.base import Learned, batch_len, concat, object_array, take

BOILERPLATE = ("image", "IMG_2041.JPG", "click to enlarge")
WORDS = "red blue green dog cat bird on the a grass sofa big small old new wooden table near river".split()


def corpus(seed: int = 0) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(seed)
    caps = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) + f" no{i}" for i in range(2000)]
    for b in BOILERPLATE:  # spelled a little differently: the normal form is shared
        caps += [b] * 25 + [f"  {b.upper()} "] * 25
    caps += ["a lovely sunny beach at dawn"] * 3
    caps += ["one two"]  # too few unigrams
    caps += [" ".join(["word"] * 21)]  # too many
    order = rng.permutation(len(caps))
    caps = [caps[i] for i in order]
    rows = {"key": object_array([f"{i:09d}" for i in range(len(caps))]), "caption": object_array(caps)}
    return rows, caps


def fit_rule(stage, rows: dict, shards: int) -> tuple[dict, Learned]:
    """key -> (reason, detail) of the rows the fit drops, over ``shards``
    shards, and the rule ``combine`` returned."""
    parts = [take(rows, idx) for idx in np.array_split(np.arange(batch_len(rows)), shards)]
    emitted = concat([stage.bucket_rows(p, Learned()) for p in parts])
    order = np.argsort(emitted["bucket"], kind="stable")
    emitted = take(emitted, order)
    cuts = np.flatnonzero(np.diff(emitted["bucket"])) + 1
    groups = np.split(np.arange(len(order)), cuts)
    rule = stage.combine(concat([stage.reduce_bucket(take(emitted, g), Learned()) for g in groups]), Learned()).rule
    out = {}
    for p in parts:
        d = stage.decide_rows(p, rule).decisions
        out.update({k: (r, json.loads(x)) for k, r, x in zip(d["key"], d["reason"], d["detail"])})
    return out, rule


def fit(stage, rows: dict, shards: int) -> dict:
    """key -> (reason, detail) of the rows the fit drops (:func:`fit_rule`)."""
    return fit_rule(stage, rows, shards)[0]


def test_boilerplate_shared_by_50_images_is_dropped_and_one_shared_by_3_kept():
    rows, caps = corpus()
    dropped = fit(AlignTextStage(Config()), rows, shards=4)
    by_caption = {}
    for k, cap in zip(rows["key"], caps):
        by_caption.setdefault(caption_form(cap), []).append(dropped.get(k))
    for b in BOILERPLATE:
        got = by_caption[caption_form(b)]
        assert len(got) == 50 and all(d == ("caption_shared", {"images": 50, "max_caption_images": 10}) for d in got)
    assert by_caption["a lovely sunny beach at dawn"] == [None] * 3
    assert by_caption["one two"] == [("too_few_unigrams", {"min_unigrams": 3, "unigrams": 2})]
    assert by_caption[" ".join(["word"] * 21)] == [("too_many_unigrams", {"max_unigrams": 20, "unigrams": 21})]
    assert Counter(r for r, _ in dropped.values()) == {
        "caption_shared": 150,
        "too_few_unigrams": 1,
        "too_many_unigrams": 1,
    }
    assert fit(AlignTextStage(Config()), rows, shards=1) == dropped  # the shard layout changes nothing


def test_rare_tokens_are_those_outside_the_top_rank_counted_over_the_dataset():
    rows, caps = corpus()
    stage = AlignTextStage(Config(rare_token_rank=len(WORDS), bigrams=False, max_caption_images=None))
    dropped, rule = fit_rule(stage, rows, shards=3)
    # the top len(WORDS) unigrams: WORDS themselves (each in hundreds of captions); "no17" is in one
    for k, cap in zip(rows["key"], caps):
        r = dropped.get(k)
        if cap.split()[-1].startswith("no"):
            assert r is not None and r[0] == "rare_token" and r[1]["tokens"] == [cap.split()[-1]], (cap, r)
            assert r[1]["min_count"] > 1 and r[1]["rare_token_rank"] == len(WORDS)
    # the stage keeps the smaller side: here the 19 frequent tokens, not the ~2,000 rare ones
    assert not rule.values["token_set_is_rare"] and len(rule.arrays["token_set"]) == len(WORDS)
    boiler = [r for k, cap in zip(rows["key"], caps) if caption_form(cap) == "image" for r in [dropped.get(k)]]
    assert boiler and all(r[0] == "rare_token" and r[1]["tokens"] == ["image"] for r in boiler)
    none = fit(AlignTextStage(Config(rare_token_rank=10**8, max_caption_images=None)), rows, shards=2)
    assert not any(r == "rare_token" for r, _ in none.values())  # fewer tokens than the rank: none is rare


def test_rules_can_be_turned_off_and_bad_values_name_the_key():
    assert not AlignTextStage(Config(max_caption_images=None, min_unigrams=None, max_unigrams=None)).needs_fit()
    with pytest.raises(ValueError, match=r"^max_caption_images: expected >= 1"):
        Config(max_caption_images=0)
    with pytest.raises(ValueError, match=r"^max_unigrams: expected >= min_unigrams"):
        Config(min_unigrams=5, max_unigrams=4)
