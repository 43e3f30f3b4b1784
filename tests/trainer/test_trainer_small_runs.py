"""``pairforge train`` on the runs a new user makes first: 0, 5 and 22
samples (issue 28). No crash; a clear message when there is nothing to
train on; recall only where it means something (k below the number of
held-out pairs), with a verdict line; logs on stderr and stdout empty
unless ``--json -``; a warning when ``--steps`` is below ``--warmup``.

The runs are written by the pipeline's own shard writer (real JPEGs, real
tars, ``sizes.json``), and the model is the repo's pf-tiny on the CPU."""

import json

import numpy as np
import pytest

from pairforge.cli import main
from pairforge.manifests.manifest import write_sizes
from pairforge.manifests.shards import write_shard
from pairforge.trainer.data import is_held_out, sample_group
from pairforge.trainer.evaluate import chance_recall, meaningful_ks, verdict
from tests.shardkit import rows

#: a handful of CPU steps of a small batch
FEW = ["--steps", "3", "--batch-size", "4", "--workers", "1", "--log-every", "1", "--eval-every", "3",
       "--device", "cpu", "--shuffle-buffer", "8"]  # fmt: skip


def make_run(folder, samples: int, rejected: int = 0):
    """A run folder whose one shard holds ``samples`` samples and ``rejected`` rejects."""
    n = samples + rejected
    batch = rows(n, rejected={i: "too_small" for i in range(samples, n)})
    stats = write_shard(batch, folder, 0)
    write_sizes(folder, [stats])
    return [str(k) for k in batch["key"][:samples]]


def held_out(keys, fraction: float) -> int:
    return sum(is_held_out(sample_group(k, {}), fraction, 0) for k in keys)


def test_an_empty_run_says_there_is_nothing_to_train_on(tmp_path, capsys):
    make_run(tmp_path / "run", 0, rejected=4)
    rc = main(["train", str(tmp_path / "run"), "--out", str(tmp_path / "t"), *FEW])
    err = capsys.readouterr()
    assert rc == 4 and err.out == ""
    assert "pairforge train: error: no samples in 1 shard(s)" in err.err and "nothing to train on" in err.err
    assert "Traceback" not in err.err and not (tmp_path / "t" / "checkpoint.pt").exists()


@pytest.mark.parametrize("samples, fraction, held", [(5, 0.0, 0), (5, 0.1, 1), (22, 0.2, 7)])
def test_a_tiny_run_trains_and_reports_recall_only_where_it_means_something(tmp_path, capsys, samples, fraction, held):
    keys = make_run(tmp_path / "run", samples)
    assert held_out(keys, fraction) == held  # the hashed split of these keys: no pair, one, a few
    out = tmp_path / "t"
    argv = ["train", str(tmp_path / "run"), "--out", str(out), *FEW, "--eval-fraction", str(fraction), "--warmup", "5"]
    assert main([*argv, "--json", str(tmp_path / "summary.json")]) == 0
    got = capsys.readouterr()
    assert got.out == ""  # logs on stderr; the summary went to its file
    assert "pairforge train: warning: --steps 3 < --warmup 5" in got.err
    assert "[train] step 3/3 loss" in got.err
    report = json.loads((out / "report.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == report["verdict"] and f"[train] {report['verdict']}" in got.err
    m = report["metrics"]
    if held == 0:
        assert m is None and report["verdict"].startswith("no held-out pairs (eval fraction")
    elif held == 1:
        assert m["image_to_text"] == {} and report["verdict"].startswith("1 held-out pair: recall needs at least 2")
    else:
        assert m["n"] == held and set(m["image_to_text"]) == {f"r@{k}" for k in (1, 5, 10) if k < held}
        assert set(m["chance"]) == set(m["image_to_text"])
        assert report["verdict"].startswith(f"recall@1 {m['image_to_text']['r@1']:.2f} vs chance ")
        assert f"on {held} held-out pairs" in report["verdict"] and "too few pairs to judge" in report["verdict"]
    assert report["data"]["eval_samples"] == held and (out / "checkpoint.pt").exists()


def test_the_summary_goes_to_stdout_only_when_asked(tmp_path, capsys):
    make_run(tmp_path / "run", 22)
    assert main(["train", str(tmp_path / "run"), "--out", str(tmp_path / "t"), *FEW, "--json", "-"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["steps"]["done"] == 3  # stdout is JSON, nothing else
    assert "[train] step" in got.err and "recall" in got.err


def test_recall_and_chance_skip_k_that_every_ranking_meets():
    for n in (1, 2, 5, 9, 10, 11):  # the crash: C(n, 10) = 0 for n < 10
        correct = np.eye(n, dtype=bool)
        assert chance_recall(correct)["r@10"] == (1.0 if n <= 10 else pytest.approx(10 / 11))
        assert meaningful_ks(n) == tuple(k for k in (1, 5, 10) if k < n)
    assert chance_recall(np.eye(5, dtype=bool), meaningful_ks(5)) == {"r@1": pytest.approx(0.2)}
    assert verdict(None, 0.1).startswith("no held-out pairs (eval fraction 0.1)")
    line = verdict({"n": 120, "image_to_text": {"r@1": 0.41}, "text_to_image": {"r@1": 0.39}, "chance": {"r@1": 0.04}})
    assert line == "recall@1 0.41 vs chance 0.04 on 120 held-out pairs (image to text; text to image 0.39)"


def test_an_unreachable_ray_address_fails_before_training(tmp_path, capsys):
    make_run(tmp_path / "run", 5)
    argv = ["train", str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--ray", "--address", "127.0.0.1:1"]
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert "pairforge train: error: --address '127.0.0.1:1': no Ray cluster answers at 127.0.0.1:1" in err
    assert not (tmp_path / "t").exists()
