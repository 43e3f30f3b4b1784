"""The trainer end to end on a small real corpus (Fashion-MNIST photos,
skimage photos, generated scenes with confounder pairs) written by the
pipeline's own shard writer: the loss falls, open_clip's own loader loads the
checkpoint, a resumed run continues the same curve, the CLI writes its files."""

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pairforge.trainer.corpus import CorpusConfig, build_corpus
from pairforge.trainer.data import Prep, find_shards, load_eval_set
from pairforge.trainer.evaluate import embed_images, evaluate
from pairforge.trainer.loop import CHECKPOINT, CURVES, REPORT, TrainConfig, lr_at, resume_config, train
from pairforge.trainer.model import create_model, export_scorer, load_checkpoint, register_configs

SMALL = CorpusConfig(
    fashion=320, scenes_one=60, scenes_count=40, scene_pairs=60, photo_variants=3, samples_per_shard=160
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = build_corpus(out, SMALL)
    assert summary["shards"] >= 4
    return out


#: a few dozen steps of a small batch: seconds on one CPU core
QUICK = {"steps": 40, "batch_size": 32, "lr": 2e-3, "warmup": 5, "eval_fraction": 0.1, "eval_limit": 200,
         "eval_every": 20, "log_every": 1, "shuffle_buffer": 200, "workers": 2, "seed": 0, "device": "cpu"}  # fmt: skip


def config(corpus, out, **kw) -> TrainConfig:
    return TrainConfig(shards=(str(corpus),), out=str(out), **{**QUICK, **kw})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    cfg = config(corpus, tmp_path_factory.mktemp("run"))
    return cfg, train(cfg)


def _open_clip_load(path):
    import open_clip

    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny", pretrained=str(path))
    return model.eval(), preprocess


# ------------------------------------------------------------------ training


def test_a_few_dozen_cpu_steps_bring_the_loss_down(trained):
    cfg, report = trained
    losses = [h["loss"] for h in report["history"]["train"]]
    assert len(losses) == cfg.steps
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.4, (first, last)
    assert report["steps"] == {"done": 40, "planned": 40, "resumed_from": 0}
    assert report["device"]["precision"] == "fp32"


def test_held_out_split_is_scored_and_beats_chance(trained):
    _, report = trained
    m = report["metrics"]
    assert m["step"] == 40 and m["n"] == report["data"]["eval_samples"] > 20
    # the held-out samples never reach training: the eval set is the hashed split
    assert m["image_to_text"]["r@5"] > m["chance"]["r@5"]
    assert m["matching_vs_shuffled"]["auc"] > 0.6
    assert set(m["by_source"]) == {"fashion", "photo", "scene"}
    assert [e["step"] for e in report["history"]["eval"]] == [20, 40]


def test_outputs_are_written(trained):
    cfg, report = trained
    assert report["data"]["shards"] == len(find_shards(cfg.shards)) >= 4
    on_disk = json.loads((Path(cfg.out) / REPORT).read_text())
    assert on_disk["metrics"] == report["metrics"]
    with Image.open(Path(cfg.out) / CURVES) as im:
        assert im.format == "PNG" and im.width > 300


def test_open_clip_loads_the_checkpoint_with_the_trained_weights(trained):
    cfg, report = trained
    path = Path(cfg.out) / CHECKPOINT
    model, _ = _open_clip_load(path)
    saved = load_checkpoint(path)["state_dict"]
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the loaded model scores the held-out split exactly as the run did at its last step
    fresh, spec = create_model("pf-tiny")
    prep = Prep("pf-tiny", spec.size)
    evalset = load_eval_set(find_shards(cfg.shards), prep, cfg.stream(), cfg.eval_limit)
    again = evaluate(model, evalset, spec, prep)
    for key in ("image_to_text", "text_to_image", "matching_vs_shuffled", "winoground"):
        assert again[key] == report["metrics"][key]
    assert evaluate(fresh, evalset, spec, prep)["matching_vs_shuffled"] != report["metrics"]["matching_vs_shuffled"]


def test_open_clip_preprocess_sees_what_training_saw(trained, corpus):
    """The clip_score stage feeds open_clip's preprocess; training feeds
    Prep + normalize_images: the embeddings must agree."""
    cfg, _ = trained
    model, preprocess = _open_clip_load(Path(cfg.out) / CHECKPOINT)
    _, spec = create_model("pf-tiny")
    prep = Prep("pf-tiny", spec.size)
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    ours = embed_images(model, torch.stack([prep.image(_jpeg(a)) for a in photos]), spec, "cpu")
    with torch.no_grad():
        theirs = model.encode_image(
            torch.stack([preprocess(Image.open(io.BytesIO(_jpeg(a)))) for a in photos]), normalize=True
        )
    cos = (ours * theirs).sum(-1)
    assert cos.min() > 0.98, cos


def test_exported_scorer_is_small_and_scores_like_the_checkpoint(trained, tmp_path):
    cfg, _ = trained
    ckpt = Path(cfg.out) / CHECKPOINT
    small = export_scorer(ckpt, tmp_path / "scorer.pt")
    assert small.stat().st_size < 0.6 * ckpt.stat().st_size  # no optimizer, float16
    full, _ = _open_clip_load(ckpt)
    half, _ = _open_clip_load(small)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        a, b = full.encode_image(x, normalize=True), half.encode_image(x, normalize=True)
    assert torch.allclose(a, b, atol=2e-2)
    assert not torch.equal(a, b)  # it really is the float16 copy


def test_fine_tuning_starts_from_the_given_checkpoint(trained, corpus, tmp_path):
    cfg, report = trained
    tuned = train(config(corpus, tmp_path / "tuned", steps=2, warmup=1, lr=1e-5, eval_every=100, eval_limit=40,
                         pretrained=str(Path(cfg.out) / CHECKPOINT)))  # fmt: skip
    from_scratch, from_checkpoint = report["history"]["train"][0]["loss"], tuned["history"]["train"][0]["loss"]
    assert from_checkpoint < from_scratch - 0.3
    assert tuned["config"]["pretrained"].endswith(CHECKPOINT)


# -------------------------------------------------------------------- resume


@pytest.mark.parametrize(("resize", "steps", "until"), [("worker", 10, 5), ("device", 6, 3)])
def test_a_resumed_run_continues_the_same_curve(corpus, tmp_path, resize, steps, until):
    """Interrupted after an odd step (the two loader workers are mid-turn)
    and resumed: the same losses and the same final weights as one run,
    with images resized in the loader workers (what a CPU run does) or in the
    training step (what a CUDA run does)."""
    kw = {"steps": steps, "batch_size": 16, "eval_every": 100, "eval_limit": 40, "augment": True, "resize": resize}
    whole = train(config(corpus, tmp_path / "whole", **kw))
    cfg = config(corpus, tmp_path / "parts", **kw)
    first = train(cfg, until=until)
    assert first["steps"]["done"] == until and len(first["history"]["train"]) == until
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT)["step"] == until
    resumed = train(resume_config(replace(cfg, steps=999, lr=1.0)))  # the saved config wins
    assert resumed["steps"] == {"done": steps, "planned": steps, "resumed_from": until}
    assert [h["loss"] for h in resumed["history"]["train"]] == [h["loss"] for h in whole["history"]["train"]]
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "parts" / CHECKPOINT)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["metrics"] == whole["metrics"]


def test_schedule_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(shards=("x",), out="y", steps=110, lr=1e-3, min_lr=1e-5, warmup=10)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(cfg, 110) == pytest.approx(1e-5)


# ----------------------------------------------------------------------- CLI


def test_cli_writes_checkpoint_report_and_curves(corpus, tmp_path, capsys):
    from pairforge.cli import main

    out = tmp_path / "cli"
    argv = ["train", str(corpus), "--out", str(out), "--steps", "4", "--batch-size", "16", "--workers", "1",
            "--eval-every", "4", "--eval-limit", "40", "--log-every", "2", "--device", "cpu", "--json", "-"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)  # stdout is the summary alone; the [train] lines are on stderr
    assert summary["steps"]["done"] == 4
    assert "[train] step 4/4" in printed.err and summary["verdict"].startswith("recall@1 ")
    assert {p.name for p in out.iterdir()} >= {CHECKPOINT, REPORT, CURVES}
    assert json.loads((out / REPORT).read_text())["config"]["batch_size"] == 16
    _open_clip_load(out / CHECKPOINT)


def test_cli_refuses_to_resume_nothing(corpus, tmp_path, capsys):
    from pairforge.trainer.cli import main

    assert main([str(corpus), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ------------------------------------------------------------------- helpers


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr)[..., :3]).save(buf, format="JPEG", quality=92)
    return buf.getvalue()
