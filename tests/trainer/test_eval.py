"""``pairforge eval`` on real images and real models: the shipped scorer
(trained on Fashion-MNIST's *training* split) against the *test* split it
never saw, and the same architecture at random initialisation; the three
layouts of a labelled set; the figures filed under a run and shown by its
report."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main
from pairforge.manifests.report import read_evals
from pairforge.manifests.report_html import evaluations
from pairforge.pipeline.datasets import FASHION_CLASSES
from pairforge.trainer.labelled import LabelledSetError, read_labelled
from pairforge.trainer.zeroshot import classify, read_templates, wilson
from tests.evalkit import fashion_test, write_image_folder

N = 400


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    images, labels = fashion_test(N)
    root = write_image_folder(tmp_path_factory.mktemp("fashion") / "test", images, labels)
    return root, images, labels


def _eval(args, tmp_path) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_wilson_interval_on_hand_numbers():
    lo, hi = wilson(81, 263)  # the textbook example (Wilson 1927, via Newcombe 1998): 0.2553-0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0, 10)[0] == 0.0 and 0.0 < wilson(0, 10)[1] < 0.35
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] > 0.65
    assert wilson(0, 0) == (0.0, 1.0)


def test_classify_counts_top1_top5_and_per_class():
    import torch

    w = torch.eye(6)
    feats = torch.eye(6)[[0, 1, 2, 2]]  # the last image is predicted 2 but is class 3
    r = classify(feats, w, np.array([0, 1, 2, 3]), [f"c{i}" for i in range(6)])
    assert r["top1"]["correct"] == 3 and r["top1"]["value"] == 0.75
    assert r["top5"]["correct"] == 4  # class 3 ties the rest at 0 and sorts within the first five
    assert r["per_class"]["c3"]["value"] == 0.0 and r["per_class"]["c0"]["value"] == 1.0
    assert r["confusion"][3][2] == 1 and r["chance"]["top1"] == pytest.approx(1 / 6)


def test_learnt_model_beats_chance_by_a_wide_margin(fashion, tmp_path):
    root, _, labels = fashion
    r = _eval([str(root), "--pretrained", "pf-tiny-scorer"], tmp_path)
    c = r["classification"]
    assert c["n"] == N and c["classes"] == 10 and r["undecodable"] == 0
    assert c["top1"]["ci95"][0] > 0.5, c["top1"]  # chance is 0.1
    assert c["top5"]["value"] > c["top1"]["value"]
    assert set(c["per_class"]) == set(FASHION_CLASSES)
    assert sum(v["n"] for v in c["per_class"].values()) == N
    assert "above chance" in r["summary"] and "Wilson" in r["summary"]


def test_random_model_is_near_chance_within_its_interval(fashion, tmp_path):
    root, _, _ = fashion
    r = _eval([str(root), "--model", "pf-tiny"], tmp_path)
    lo, hi = r["classification"]["top1"]["ci95"]
    assert lo <= 0.1 <= hi, (lo, hi)
    assert r["model"]["pretrained"] is None


def test_parquet_and_webdataset_sets_give_the_figures_of_the_folder(fashion, tmp_path):
    root, images, labels = fashion
    n = 120
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(FASHION_CLASSES) + "\n")
    # Hugging Face's layout: an image struct {bytes, path} and integer labels
    pq.write_table(
        pa.table({"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images[:n])],
                  "label": labels[:n].tolist()}),
        tmp_path / "test.parquet",
    )  # fmt: skip
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(n):
            for ext, data in (("png", images[i]), ("cls", str(int(labels[i])).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = ["--pretrained", "pf-tiny-scorer", "--classes", str(names), "--limit", str(n)]
    a = _eval([str(tmp_path / "test.parquet"), *args], tmp_path)
    b = _eval([str(tmp_path / "00000.tar"), *args], tmp_path)
    assert a["classification"]["top1"] == b["classification"]["top1"]
    assert a["classification"]["n"] == n and a["classification"]["top1"]["ci95"][0] > 0.4


def test_set_errors_name_the_file_and_the_column(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "label": [3]}), tmp_path / "t.parquet")
    with pytest.raises(LabelledSetError, match="integer labels need class names"):
        read_labelled(tmp_path / "t.parquet")
    with pytest.raises(LabelledSetError, match="no label column 'y'"):
        read_labelled(tmp_path / "t.parquet", label_column="y")
    (tmp_path / "t.txt").write_text("a photo of {}\nno placeholder\n")
    with pytest.raises(ValueError, match=r"t.txt:2"):
        read_templates(tmp_path / "t.txt")
    assert main(["eval", str(tmp_path / "t.parquet"), "--name", "../x"]) == 2


def test_broken_image_is_counted_and_a_run_files_the_figures_for_its_report(fashion, tmp_path):
    root, _, _ = fashion
    (root / "bag" / "zz-broken.png").write_bytes(b"\x89PNG not really")
    run = tmp_path / "run"
    run.mkdir()
    try:
        assert (
            main(["eval", str(root), "--pretrained", "pf-tiny-scorer", "--run", str(run), "--name", "fashion-test"])
            == 0
        )
    finally:
        (root / "bag" / "zz-broken.png").unlink()
    (run / "eval" / "junk.json").write_text("[1, 2")  # not JSON: listed with a note, never trusted
    evals = {e["name"]: e for e in read_evals(run)}
    assert set(evals) == {"fashion-test", "junk"}
    assert evals["junk"]["summary"].startswith("unreadable")
    html = evaluations(list(evals.values()))
    assert "zero-shot top-1" in html and "pf-tiny-scorer" in html and "<td>bag</td>" in html
    filed = evals["fashion-test"]
    assert filed["undecodable"] == 1 and filed["images"] == N + 1
    assert sum(v["n"] for v in filed["classification"]["per_class"].values()) == N


def test_held_out_pairs_are_the_trainers_own(fashion, tmp_path):
    """``--pairs OUT`` scores the very pairs ``pairforge train`` held out
    (its fraction and seed read from the checkpoint): the same n and the
    same recall as the trainer's own report."""
    from pairforge.trainer.corpus import CorpusConfig, build_corpus
    from pairforge.trainer.loop import TrainConfig, train

    corpus = tmp_path / "corpus"
    build_corpus(corpus, CorpusConfig(fashion=400, scenes_one=0, scenes_count=0, scene_pairs=0, photo_variants=0,
                                      samples_per_shard=100))  # fmt: skip
    cfg = TrainConfig(shards=(str(corpus),), out=str(tmp_path / "train"), model="pf-micro", steps=8, batch_size=32,
                      warmup=2, eval_fraction=0.15, eval_every=8, workers=1, seed=3, device="cpu")  # fmt: skip
    report = train(cfg)
    root, _, _ = fashion
    r = _eval([str(root), "--pretrained", str(tmp_path / "train" / "checkpoint.pt"), "--pairs", str(corpus),
               "--limit", "50"], tmp_path)  # fmt: skip
    assert r["model"]["name"] == "pf-micro" and r["model"]["step"] == 8
    pairs = r["held_out_pairs"]
    assert pairs["n"] == report["metrics"]["n"] and pairs["seed"] == 3 and pairs["eval_fraction"] == 0.15
    assert pairs["image_to_text"] == pytest.approx(report["metrics"]["image_to_text"])
    assert "held-out pairs recall@1" in r["summary"]


def test_the_runs_report_shows_the_filed_evaluation_escaped(tmp_path):
    """A run folder with an ``eval/`` file: ``pairforge report`` draws the
    Evaluation section from it, every value escaped (the file is data)."""
    from pathlib import Path

    from pairforge.manifests.report import write_report
    from pairforge.manifests.shards import write_shard
    from tests.shardkit import rows

    write_shard(rows(3, 0), tmp_path, 0)
    (tmp_path / "manifest.json").write_text(json.dumps({"counts": {"input": 3, "ok": 3, "rejected": 0}, "stages": []}))
    (tmp_path / "eval").mkdir()
    filed = {"summary": "zero-shot top-1 0.500 <b>x</b>", "model": {"name": "pf-micro", "pretrained": "ck.pt"},
             "classification": {"per_class": {"<script>bag": {"value": 0.5, "ci95": [0.2, 0.8], "n": 10}}}}  # fmt: skip
    (tmp_path / "eval" / "fashion.json").write_text(json.dumps(filed))
    done = write_report(tmp_path, grid=1)
    page = Path(done["path"]).read_text()
    assert done["evals"] == 1 and 'id="s-eval"' in page
    assert (
        "zero-shot top-1 0.500 &lt;b&gt;x&lt;/b&gt;" in page and "&lt;script&gt;bag" in page and "<script>" not in page
    )
    assert "0.200-0.800" in page


def test_a_limit_on_a_folder_keeps_every_class(fashion):
    root, _, _ = fashion
    s = read_labelled(root, limit=20)
    assert len(s) == 20 and sorted(np.bincount(s.labels, minlength=10).tolist()) == [2] * 10
