"""The clip_score stage on pf-tiny on the CPU: its scores and embeddings are
a direct open_clip computation's, a row's score does not depend on its batch
(bit for bit), the GPU-style decode path stays close to PIL's, and a row
that does not decode fails alone; its config and the nvimgcodec decoder's
checks; and Ray's actor pool, with and without CPU prefetch, gives the
in-process results. Filtering by threshold and top_fraction:
tests/stages/test_clip_score_filter.py."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pairforge.pipeline.config import ConfigError, build
from pairforge.pipeline.local import map_stage, run_global
from pairforge.stages.base import STATUS_OK, concat, take
from pairforge.stages.clip_score import PIXELS, TOKENS, ClipScoreStage, Config
from pairforge.stages.common import clip as _clip
from pairforge.stages.common import gpudecode
from tests import clipkit
from tests.clipkit import draw, encoded, planted, rows_of, run_top_fraction, stage

trained_ckpt = clipkit.trained_ckpt  # this module's own checkpoint (module scope)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    import open_clip

    _clip.register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.save(model.state_dict(), path)
    return str(path), model.eval(), preprocess


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


# ------------------------------------------------------------------ config


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
    mix = build(Config, {"pretrained": "x.pt", "nvimgcodec_backends": ["HW_GPU_ONLY:0.8:adaptive", "HYBRID_CPU_GPU"]}, "s")
    assert mix.nvimgcodec_backends == ("HW_GPU_ONLY:0.8:adaptive", "HYBRID_CPU_GPU")
    assert gpudecode.parse_backends(mix.nvimgcodec_backends) == (("HW_GPU_ONLY", 0.8, True), ("HYBRID_CPU_GPU", 1.0, False))
    for bad in (["HW_GPU_ONLY:1.5"], ["HW_GPU_ONLY:0.5:later"], ["FAST"], []):
        with pytest.raises(ConfigError, match="s.nvimgcodec_backends: .*expected"):
            build(Config, {"pretrained": "x.pt", "nvimgcodec_backends": bad}, "s")
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


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_threaded_cpu_decode_keeps_every_image_in_its_place(threads):
    """decode_cpu hands each thread a slice of the images: the result is in
    input order and pixel for pixel what one decode per image gives, failures
    included, whatever the threads (more threads than images too)."""
    rng = np.random.default_rng(3)
    images = [encoded(draw(c, "circle", rng, size=(40 + 8 * i, 48)), "PNG" if i % 4 == 3 else "JPEG")
              for i, c in enumerate(["red", "green", "blue", "red", "green", "blue", "red"])]  # fmt: skip
    images[2] = b"not an image"
    tensors, errors = _clip.decode_cpu(images, "cpu", threads)
    assert [e is not None for e in errors] == [i == 2 for i in range(len(images))]
    for data, t in zip(images, tensors):
        one, _ = _clip.decode_tensors([data], "cpu")
        assert (t is None and one[0] is None) or torch.equal(t, one[0])


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

    from pairforge.pipeline import plan

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
    from pairforge.pipeline.local import map_stage as local_map

    rows, _ = planted(n_per_colour=4)
    rows["image"][3] = b"not an image"
    direct = local_map(stage(trained_ckpt, image_decode="libjpeg"), dict(rows))
    pre_stage = stage(trained_ckpt, image_decode="libjpeg", cpu_prefetch=True)
    assert pre_stage.resources().cpu_prepare and not stage(trained_ckpt).resources().cpu_prepare
    pre = local_map(pre_stage, dict(rows))
    assert not [c for c in pre if c.startswith("__pf_")]
    assert list(pre["reason"]) == list(direct["reason"]) and pre["reason"][3] == "decode_error"
    ok = ~np.isnan(direct["clip_score"])
    assert np.allclose(pre["clip_score"][ok], direct["clip_score"][ok], atol=1e-5)
    assert np.array_equal(np.isnan(pre["clip_score"]), ~ok)
