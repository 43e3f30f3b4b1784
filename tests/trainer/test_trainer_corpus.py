"""The scorer's corpus (real Fashion-MNIST and skimage photos, generated
scenes) as shards, the held-out split and the training stream over them."""

import hashlib
import itertools
import json
import random
from collections import Counter

import numpy as np
import pytest

from pairforge.pipeline.datasets import skimage_photos
from pairforge.trainer import scenes
from pairforge.trainer.corpus import EXTRA_PHOTOS, FASHION_NAMES, CorpusConfig, build_corpus
from pairforge.trainer.data import (
    CONFOUNDER_OF,
    NEGATIVE_CAPTION,
    Prep,
    StreamConfig,
    TrainStream,
    find_shards,
    is_held_out,
    load_eval_set,
    sample_group,
    shard_sizes,
)

TINY = CorpusConfig(fashion=60, scenes_one=10, scenes_count=10, scene_pairs=15, photo_variants=1, samples_per_shard=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = build_corpus(out, TINY)
    return out, summary


def _samples(shard: str) -> list[dict]:
    import webdataset as wds

    return [
        {"key": s["__key__"], "caption": s["txt"].decode(), "meta": json.loads(s["json"]), "jpg": s["jpg"]}
        for s in wds.tarfile_samples([{"url": shard}])
    ]


def test_confounder_pairs_use_the_same_words_for_different_pictures():
    rng = random.Random(3)
    for _ in range(30):
        a, b = scenes.confounder_pair(rng)
        assert a.caption != b.caption and Counter(a.caption.split()) == Counter(b.caption.split())
        assert a.concept != b.concept
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() > 40


def test_corpus_is_written_as_a_runs_shards_with_its_metadata(corpus):
    out, summary = corpus
    shards = find_shards([out])
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    photos = len(skimage_photos()) + len(EXTRA_PHOTOS)  # each once at photo_variants=1
    assert sum(sizes.values()) == summary["samples"] == 60 + photos + 10 + 10 + 2 * 15
    assert shard_sizes(shards) == {s: sizes[s.rsplit("/", 1)[1]] for s in shards}
    samples = [s for shard in shards for s in _samples(shard)]
    assert Counter(s["meta"]["source"] for s in samples) == {"fashion": 60, "photo": photos, "scene": 50}
    by_key = {s["key"]: s for s in samples}
    partners = [s for s in samples if s["meta"][CONFOUNDER_OF]]
    assert len(partners) == 15
    for s in partners:  # each partner names the other's caption as its hard negative
        first = by_key[s["meta"][CONFOUNDER_OF]]
        assert s["meta"][NEGATIVE_CAPTION] == first["caption"] and first["meta"][NEGATIVE_CAPTION] == s["caption"]
    assert all(s["meta"]["concept"] for s in samples)
    for s in samples:  # a fashion caption names the photo's class in one of its names
        if s["meta"]["source"] == "fashion":
            assert any(name in s["caption"] for name in FASHION_NAMES[s["meta"]["label"]]), s


def test_corpus_is_deterministic(corpus, tmp_path):
    out, _ = corpus
    build_corpus(tmp_path, TINY)

    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "shards").glob("*.tar"))}

    assert digests(out) == digests(tmp_path)


def test_split_keeps_confounder_partners_together_and_out_of_training(corpus):
    out, _ = corpus
    shards = find_shards([out])
    cfg = StreamConfig(batch_size=4, shuffle_buffer=50, shuffle_initial=10, eval_fraction=0.3, seed=0)
    samples = [s for shard in shards for s in _samples(shard)]
    held = {s["key"] for s in samples if is_held_out(sample_group(s["key"], s["meta"]), 0.3)}
    assert 0.15 < len(held) / len(samples) < 0.45
    for s in samples:
        if s["meta"][CONFOUNDER_OF]:
            assert (s["key"] in held) == (s["meta"][CONFOUNDER_OF] in held)
    # one epoch of the training stream: every sample not held out, once
    stream = TrainStream(shards, Prep("pf-tiny", 64), cfg)
    n_train = len(samples) - len(held)
    first_epoch = [p["key"] for p, epoch in itertools.islice(stream._raw(0, 1), n_train)]
    assert sorted(first_epoch) == sorted({s["key"] for s in samples} - held)
    assert first_epoch != sorted(first_epoch)  # shuffled
    evalset = load_eval_set(shards, Prep("pf-tiny", 64), cfg)
    assert sorted(evalset.keys) == sorted(held) and evalset.images.shape[1:] == (3, 64, 64)


def test_find_shards_accepts_runs_folders_tars_and_brace_patterns(corpus):
    out, _ = corpus
    shards = find_shards([out])
    assert find_shards([out / "shards"]) == shards
    assert find_shards([shards[1], shards[0], shards[0]]) == shards[:2]
    assert find_shards([str(out / "shards" / "{00000..00001}.tar")]) == shards[:2]
    with pytest.raises(FileNotFoundError):
        find_shards([out / "nothing-here.tar"])
