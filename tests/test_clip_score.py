import hashlib
import io
import json
import logging
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, build
from pipeline.local import fit_global, map_stage, run_global
from stages.base import STATUS_OK, batch_len, concat, fresh_rows, object_array, reject, take
from stages.clip_score import BINS, PIXELS, TOKENS, ClipScoreStage, Config
from stages.common import clip as _clip

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw(colour, shape, rng, size=(64, 64)):
    w, h = size
    im = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    r = int(rng.integers(10, min(w, h) // 2 - 4))
    cx, cy = int(rng.integers(r + 2, w - r - 2)), int(rng.integers(r + 2, h - r - 2))
    d, c = ImageDraw.Draw(im), COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    return im


def encoded(im, fmt="JPEG"):
    buf = io.BytesIO()
    im.save(buf, fmt, quality=95) if fmt == "JPEG" else im.save(buf, fmt)
    return buf.getvalue()


def rows_of(images, captions, keys=None):
    n = len(images)
    return fresh_rows(
        keys or [f"00000{i:04d}" for i in range(n)],
        image=object_array(images),
        image_ext=object_array(["jpg"] * n),
        caption=object_array(captions),
    )


def planted(n_per_colour=8, seed=1, size=(96, 80)):
    """Coloured shapes; even rows carry their own caption, odd rows a
    caption naming another colour."""
    rng = np.random.default_rng(seed)
    cols = list(COLOURS)
    images, captions, match = [], [], []
    for i in range(n_per_colour * len(cols)):
        colour, shape = cols[i % len(cols)], SHAPES[int(rng.integers(3))]
        images.append(encoded(draw(colour, shape, rng, size)))
        said = colour if i % 2 == 0 else cols[(i + 1 + i // 7 % 4) % len(cols)]
        captions.append(f"a {said} {shape}")
        match.append(i % 2 == 0)
    return rows_of(images, captions), np.array(match)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    import open_clip

    _clip.register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.save(model.state_dict(), path)
    return str(path), model.eval(), preprocess


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """pf-tiny trained for ~100 InfoNCE steps on coloured shapes captioned
    "a <colour> <shape>" (a few seconds on one core): it tells colours apart."""
    import open_clip

    _clip.register_model_configs()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny")
    tokenizer = open_clip.get_tokenizer("pf-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    cols, labels = list(COLOURS), torch.arange(len(COLOURS))
    model.train()
    for _ in range(100):
        shapes = [SHAPES[int(s)] for s in rng.integers(0, 3, len(cols))]
        x = torch.stack([preprocess(draw(c, s, rng)) for c, s in zip(cols, shapes)])
        t = tokenizer([f"a {c} {s}" for c, s in zip(cols, shapes)])
        logits = 20 * F.normalize(model.encode_image(x), dim=-1) @ F.normalize(model.encode_text(t), dim=-1).T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def stage(ckpt, **kw):
    kw.setdefault("micro_batch", 16)
    return ClipScoreStage(Config(pretrained=ckpt, model="pf-tiny", device="cpu", **kw))


def ok_rows(out):
    return out["status"] == STATUS_OK


# ------------------------------------------------------------------ scores


def test_scores_equal_a_direct_open_clip_computation(random_ckpt):
    path, model, preprocess = random_ckpt
    import open_clip

    rng = np.random.default_rng(3)
    pics = [
        draw("red", "circle", rng, (120, 90)),
        draw("blue", "square", rng, (64, 200)),
        draw("green", "triangle", rng),
    ]
    images = [encoded(pics[0]), encoded(pics[1], "PNG"), encoded(pics[2], "WEBP")]
    captions = ["a red circle", "a blue square on a table", "green"]
    out = map_stage(stage(path), rows_of(images, captions))
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("pf-tiny")(captions)), dim=-1)
    want = (img * txt).sum(-1).numpy()
    assert np.abs(out["clip_score"] - want).max() < 1e-3
    assert out["img_emb"].dtype == np.float16 and out["img_emb"].shape == (3, 128)
    assert np.abs(out["img_emb"].astype(np.float32) - img.numpy()).max() < 1e-3
    assert np.abs(out["text_emb"].astype(np.float32) - txt.numpy()).max() < 1e-3
    assert list(out["status"]) == [STATUS_OK] * 3


def test_a_rows_score_does_not_depend_on_its_batch(random_ckpt):
    rows, _ = planted(n_per_colour=5)
    whole = map_stage(stage(random_ckpt[0], batch_size=30), rows)
    parts = map_stage(stage(random_ckpt[0], batch_size=7), take(rows, np.arange(3, 30)))
    assert np.array_equal(whole["clip_score"][3:], parts["clip_score"])  # bit for bit
    assert np.array_equal(whole["img_emb"][3:], parts["img_emb"])


def test_gpu_style_decode_path_stays_close_to_pil(random_ckpt, trained_ckpt):
    rows, _ = planted(n_per_colour=3, size=(150, 110))
    st = stage(trained_ckpt)
    st.setup()
    tensors, errors = _clip.decode_tensors(list(rows["image"]), "cpu")
    ours = _clip.normalize(_clip.resize_crop(tensors, st._loaded.cfg), st._loaded.cfg)
    ref = torch.stack([st._loaded.preprocess(Image.open(io.BytesIO(b))) for b in rows["image"]])
    assert errors == [None] * len(tensors) and ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02  # 1/255 is 0.015 after normalisation
    pil = map_stage(stage(trained_ckpt, image_decode="pil"), rows)
    tv = map_stage(stage(trained_ckpt, image_decode="nvjpeg"), rows)
    assert np.abs(pil["clip_score"] - tv["clip_score"]).max() < 0.02


def test_undecodable_image_fails_the_row_only(random_ckpt):
    rows, _ = planted(n_per_colour=1)
    rows["image"][1] = b"\xff\xd8\xff this is not a jpeg"
    rows["image"][2] = None
    for decode in ("pil", "nvjpeg"):
        out = map_stage(stage(random_ckpt[0], image_decode=decode), dict(rows))
        assert list(out["reason"][:4]) == ["", "decode_error", "decode_error", ""]
        assert list(out["status"][1:3]) == ["failed", "failed"]
        assert np.isnan(out["clip_score"][1]) and not np.isnan(out["clip_score"][3])
        assert not out["img_emb"][1].any() and out["img_emb"][3].any()


# --------------------------------------------------------------- filtering


def test_trained_scorer_separates_planted_matches(trained_ckpt):
    rows, match = planted()
    s = map_stage(stage(trained_ckpt), rows)["clip_score"]
    assert s[match].min() > s[~match].max() + 0.02


def test_threshold_keeps_matches_drops_shuffled_with_score_threshold_and_model(trained_ckpt):
    rows, match = planted()
    s = map_stage(stage(trained_ckpt), dict(rows))["clip_score"]
    t = float(s[match].min() + s[~match].max()) / 2
    out = map_stage(stage(trained_ckpt, threshold=t), rows)
    assert np.array_equal(ok_rows(out), match)
    assert set(out["reason"][~match]) == {"clip_score_below_threshold"}
    d = json.loads(out["detail"][1])
    sha = hashlib.sha256(open(trained_ckpt, "rb").read()).hexdigest()
    assert d["model"] == {"name": "pf-tiny", "pretrained": trained_ckpt, "sha256": sha}
    assert d["threshold"] == t and abs(d["clip_score"] - s[1]) < 1e-6 and d["clip_score"] < t


def run_top_fraction(st, rows):
    """The in-process runner's calls: per row, then the fit and its per-shard rule."""
    return run_global(st, map_stage(st, rows))


def finalize(st, batch):
    """Apply the rule ``combine`` left on the stage (``decide_rows``) to the ok rows of ``batch``."""
    ok = np.flatnonzero(ok_rows(batch))
    dec = st.decide_rows({"key": batch["key"][ok], "clip_score": batch["clip_score"][ok]}).decisions
    out = dict(batch)
    if batch_len(dec):
        mask = np.isin(out["key"].astype(str), dec["key"].astype(str))
        reject(out, mask, st.name, "clip_score_below_top_fraction", [json.loads(d) for d in dec["detail"]])
    return out


def test_top_fraction_keeps_exactly_the_top_share(trained_ckpt):
    rows, match = planted()
    out = run_top_fraction(stage(trained_ckpt, top_fraction=0.5), rows)
    assert np.array_equal(ok_rows(out), match)
    n = len(match)
    for f in (0.0, 0.13, 0.37, 0.9, 1.0):
        st = stage(trained_ckpt, top_fraction=f)
        out = run_top_fraction(st, dict(rows))
        keep = ok_rows(out)
        assert keep.sum() == int(np.floor(f * n + 0.5))
        if 0 < keep.sum() < n:
            assert out["clip_score"][keep].min() > out["clip_score"][~keep].max()
            d = json.loads(out["detail"][np.flatnonzero(~keep)[0]])
            assert d["top_fraction"] == f and d["exact"] and d["model"]["name"] == "pf-tiny"
            assert set(out["reason"][~keep]) == {"clip_score_below_top_fraction"}


def test_top_fraction_breaks_ties_by_key(trained_ckpt):
    rows, _ = planted(n_per_colour=2)
    twins = take(rows, np.zeros(6, dtype=np.int64))  # six copies of one pair: equal scores
    twins["key"] = object_array([f"00000{i:04d}" for i in (90, 91, 92, 93, 94, 95)])
    both = concat([rows, twins])
    s = map_stage(stage(trained_ckpt), dict(both))["clip_score"]
    rank = int(np.sum(s > s[0]))  # rows strictly above the twins
    f = (rank + 3 + 0.2) / len(s)  # the cut falls among the twins (row 0 is one of them)
    out = run_top_fraction(stage(trained_ckpt, top_fraction=f), both)
    keep = ok_rows(out)
    assert keep.sum() == rank + 3
    tied = np.flatnonzero(s == s[0])
    assert list(out["key"][tied][keep[tied]]) == sorted(out["key"][tied])[:3]


def fit_with_sample(st, rows, sample, size=10):
    """The fit steps with ``learn`` fed a chosen sample (a run samples by key hash)."""
    st.learn(sample)
    n = batch_len(rows)
    cands = concat([st.bucket_rows(take(rows, np.arange(i, min(i + size, n)))) for i in range(0, n, size)])
    groups = defaultdict(list)
    for i, g in enumerate(cands["bucket"]):
        groups[int(g)].append(i)
    st.combine(concat([st.reduce_bucket(take(cands, np.asarray(ix))) for _, ix in sorted(groups.items())]))


def test_top_fraction_is_exact_from_a_sample_and_says_when_a_sample_misled(trained_ckpt, caplog):
    rows, _ = planted(n_per_colour=10)
    st = stage(trained_ckpt, top_fraction=0.3)
    scored = map_stage(st, rows)
    fit = {"key": scored["key"], "clip_score": scored["clip_score"]}
    k = int(np.floor(0.3 * len(rows["key"]) + 0.5))
    fit_with_sample(st, fit, take(fit, np.arange(0, len(fit["key"]), 3)))
    assert st._cut["exact"] and ok_rows(finalize(st, dict(scored))).sum() == k
    low = take(fit, np.argsort(fit["clip_score"])[:10])  # a sample of the worst rows only
    with caplog.at_level(logging.WARNING):
        fit_with_sample(st, fit, low)
    out = finalize(st, dict(scored))
    assert not st._cut["exact"] and "outside the sampled window" in caplog.text
    assert ok_rows(out).sum() >= k and json.loads(out["detail"][~ok_rows(out)][0])["exact"] is False


def test_fit_sends_histograms_not_rows_outside_the_window():
    rng = np.random.default_rng(0)
    n = 20000
    fit = {
        "key": object_array([f"{i:09d}" for i in range(n)]),
        "clip_score": rng.normal(0.3, 0.05, n).astype(np.float32),
    }
    st = ClipScoreStage(Config(pretrained="unused.pt", top_fraction=0.3))
    st.learn(take(fit, np.arange(0, n, 4)))  # a sample, as a run gives
    c = st.bucket_rows(fit)
    windowed = c["bucket"] >= BINS
    assert 0 < windowed.sum() < n / 5  # per-row data only near the cut
    assert c["count"][~windowed].sum() == n  # every row in the histogram
    red = st.reduce_bucket(take(c, np.flatnonzero(c["bucket"] == c["bucket"][0])))
    assert batch_len(red) == 1 and red["count"][0] == c["count"][0]
    st.combine(concat([c]))  # a single batch's candidates need no reduction to be exact
    keep = finalize(st, fresh_rows(fit["key"], **{c: v for c, v in fit.items() if c != "key"}))
    kept = np.sort(fit["clip_score"][keep["status"] == STATUS_OK])
    assert len(kept) == 6000 and kept[0] == np.sort(fit["clip_score"])[-6000]
    assert not fit_global(ClipScoreStage(Config(pretrained="unused.pt")), fit)  # no top_fraction: no fit


def test_embed_dim_reads_the_config_file_as_open_clip_does(monkeypatch):
    import open_clip

    _clip.register_model_configs()
    want = {m: int(open_clip.get_model_config(m)["embed_dim"]) for m in ("ViT-B-32", "pf-tiny")}

    def no_open_clip():
        raise AssertionError("embed_dim fell back to open_clip")

    monkeypatch.setattr(_clip, "register_model_configs", no_open_clip)  # the fallback's first call
    assert {m: _clip.embed_dim(m) for m in want} == want == {"ViT-B-32": 512, "pf-tiny": 128}


def test_config_checks():
    assert build(Config, {"pretrained": "x.pt", "concurrency": [1, 4], "top_fraction": 0.3}, "s").concurrency == (1, 4)
    with pytest.raises(ConfigError, match="pretrained"):
        build(Config, {"model": "ViT-B-32"}, "s")
    with pytest.raises(ConfigError, match="s.image_decode: expected one of .*'nvimgcodec'.*, got 'gpu'"):
        build(Config, {"pretrained": "x.pt", "image_decode": "gpu"}, "s")
    assert build(Config, {"pretrained": "x.pt", "image_decode": "nvimgcodec"}, "s").image_decode == "nvimgcodec"
    with pytest.raises(ConfigError, match="top_fraction"):
        build(Config, {"pretrained": "x.pt", "top_fraction": 30}, "s")
    st = ClipScoreStage(Config(pretrained="x.pt", num_gpus=0.5, concurrency=(2, 2)))
    r = st.resources()
    assert (r.num_gpus, r.concurrency) == (0.5, (2, 2)) and st.runs_on_actors and not st.needs_fit()
    cols = {c.name: c for c in st.outputs()}
    assert cols["img_emb"].shape == (512,) and cols["img_emb"].store == "embeddings"  # ViT-B-32, from its config


def test_nvimgcodec_fails_at_setup_saying_what_is_missing(monkeypatch):
    # no GPU: refused before the model loads, naming the value and what to use instead
    with pytest.raises(RuntimeError, match="image_decode: nvimgcodec needs a GPU.*'cpu'.*pil or libjpeg"):
        stage("unused.pt", image_decode="nvimgcodec").setup()
    # a GPU but no package: an ImportError naming it (nothing touches CUDA before)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.nvimgcodec", None)
    cuda = ClipScoreStage(Config(pretrained="unused.pt", model="pf-tiny", device="cuda", image_decode="nvimgcodec"))
    with pytest.raises(ImportError, match="image_decode: nvimgcodec needs the nvidia-nvimgcodec-cu13 package"):
        cuda.setup()
    assert cuda._loaded is None


def test_nvimgcodec_prefetch_only_tokenises():
    rows, _ = planted(1)
    st = ClipScoreStage(Config(pretrained="unused.pt", model="pf-tiny", image_decode="nvimgcodec", cpu_prefetch=True))
    out = st.cpu_prepare(dict(rows))
    assert TOKENS in out and PIXELS not in out  # the actors decode: only bytes and tokens travel


# --------------------------------------------------------------------- Ray


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [False, True])
def test_ray_actor_pool_gives_the_in_process_results(trained_ckpt, ray_local, prefetch):
    import ray

    from pipeline import plan

    rows, _ = planted(n_per_colour=10)
    cfg = dict(top_fraction=0.4, threshold=-0.5, batch_size=16, concurrency=(2, 2), cpu_prefetch=prefetch)
    if prefetch:
        cfg["image_decode"] = "libjpeg"  # what the prefetch tasks decode with
    local = run_top_fraction(stage(trained_ckpt, **cfg), dict(rows))
    st = stage(trained_ckpt, **cfg)
    items = [{c: rows[c][i] for c in rows} for i in range(len(rows["key"]))]
    ds = ray.data.from_items(items, override_num_blocks=4)
    if prefetch:  # CPU tasks ahead of the actors, as the plan builds them
        ds = ds.map_batches(plan._cpu_prepare, fn_kwargs={"stage": st}, batch_size=16, batch_format="numpy")
    ds = ds.map_batches(
        plan._actor_class(st),
        fn_constructor_kwargs={"stage": st},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=16,
        batch_format="numpy",
    )
    remote = concat(list(ds.iter_batches(batch_format="numpy", batch_size=None)))
    order = np.argsort(remote["key"].astype(str))
    remote = run_global(st, take(remote, order))  # the fit and its per-shard rule
    assert list(remote["key"]) == list(local["key"])
    assert np.array_equal(remote["clip_score"], local["clip_score"])
    assert np.array_equal(remote["img_emb"], local["img_emb"])
    assert list(remote["status"]) == list(local["status"]) and list(remote["reason"]) == list(local["reason"])
    alive = int((local["clip_score"] >= -0.5).sum())
    assert 0 < alive < 60 and (local["status"] == STATUS_OK).sum() == int(np.floor(0.4 * alive + 0.5))


def test_cpu_prefetch_gives_the_libjpeg_scores(trained_ckpt):
    """Decode/resize/tokenise in prefetch (CPU tasks under Ray), towers in
    process_batch: the same pixels as the libjpeg decoder, so the same scores."""
    from pipeline.local import map_stage as local_map

    rows, _ = planted(n_per_colour=4)
    rows["image"][3] = b"not an image"
    direct = local_map(stage(trained_ckpt, image_decode="libjpeg"), dict(rows))
    pre_stage = stage(trained_ckpt, image_decode="libjpeg", cpu_prefetch=True)
    assert pre_stage.has_cpu_prepare() and not stage(trained_ckpt).has_cpu_prepare()
    pre = local_map(pre_stage, dict(rows))
    assert not [c for c in pre if c.startswith("__pf_")]
    assert list(pre["reason"]) == list(direct["reason"]) and pre["reason"][3] == "decode_error"
    ok = ~np.isnan(direct["clip_score"])
    assert np.allclose(pre["clip_score"][ok], direct["clip_score"][ok], atol=1e-5)
    assert np.array_equal(np.isnan(pre["clip_score"]), ~ok)
