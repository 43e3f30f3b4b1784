"""The whole-job check (``pipeline.checks``): every bad job of issue 13 ends
with exit code 2 and one line naming the key and the value, in a fresh
process that never started (or even imported) Ray, in well under 5 s."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.pipeline import checks
from pairforge.pipeline.config import ConfigError, load_job

ROOT = Path(__file__).resolve().parents[2]
SCORER = ROOT / "pipeline" / "assets" / "pf-tiny-scorer.pt"

#: name -> (stages, strings the error line must hold)
BAD_JOBS = {
    "model_typo": (
        ["download", {"name": "clip_score", "model": "ViT-B-33", "pretrained": "laion2b_s34b_b79k"}, "shard"],
        ["stages[1](clip_score).model", "'ViT-B-33'", "did you mean 'ViT-B-32'"],
    ),
    "tag_without_network": (
        ["download", {"name": "clip_score", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "shard"],
        [
            "stages[1](clip_score).pretrained",
            "'laion2b_s34b_b79k'",
            "cannot be downloaded (HF_HUB_OFFLINE=1)",
            "pretrained: /path/to/weights",
            "pretrained: pf-tiny-scorer",
        ],
    ),
    "missing_checkpoint": (
        ["download", {"name": "clip_score", "model": "pf-tiny", "pretrained": "ckpt/missing.pt"}, "shard"],
        ["stages[1](clip_score).pretrained", "no file 'ckpt/missing.pt'"],
    ),
    "semantic_dedup_without_clip_score": (
        ["download", "dedup_semantic", "shard"],
        ["stages[1](dedup_semantic)", "column 'img_emb'", "add a 'clip_score' stage before it"],
    ),
    "threshold_as_string": (
        ["download", {"name": "clip_score", "model": "pf-tiny", "pretrained": "random", "threshold": "0.3"}, "shard"],
        ["stages[1](clip_score).threshold", "expected a number", "'0.3'"],
    ),
    "timeout_as_string": (
        [{"name": "download", "timeout": "10"}, "shard"],
        ["stages[0](download).timeout", "expected a number", "'10'"],
    ),
    "negative_retries": (
        [{"name": "download", "retries": -3}, "shard"],
        ["stages[0](download).retries", "expected >= 0", "-3"],
    ),
}

#: runs ``pairforge run JOB`` in this fresh process and says what happened
PROBE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from pairforge.cli import main
    rc = main(["run", sys.argv[1]])
    seconds = time.perf_counter() - t0
    imported = "ray" in sys.modules
    import ray
    print(json.dumps({"rc": rc, "seconds": seconds, "ray_imported": imported, "ray_up": ray.is_initialized()}))
    """
)


def _urls(tmp_path: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a cat on a mat"]}), path)
    return path


def _write_job(tmp_path: Path, stages: list) -> Path:
    _urls(tmp_path)
    job = {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out"}, "stages": stages}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


@pytest.mark.parametrize("name", sorted(BAD_JOBS))
def test_bad_job_fails_fast_naming_key_and_value(tmp_path, name):
    stages, needles = BAD_JOBS[name]
    job = _write_job(tmp_path, stages)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no network here, and none may be tried
        "HF_HOME": str(tmp_path / "hf"),  # an empty Hugging Face cache
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pairforge: error: ")]
    assert got["rc"] == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in proc.stderr
    assert not got["ray_imported"] and not got["ray_up"]
    assert got["seconds"] < 5, got
    assert not (tmp_path / "out").exists()  # nothing written


def test_every_problem_is_reported_at_once(tmp_path):
    _urls(tmp_path)
    job = load_job(
        {
            "input": {"paths": ["urls.parquet"], "caption_col": "text"},
            "output": {"dir": "out"},
            "stages": ["download", {"name": "dedup_semantic", "eps": 3.0}, {"name": "clip_score", "pretrained": "x.pt"}]
            + ["shard"],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as e:
        checks.check_job(job)
    lines = str(e.value).splitlines()
    assert any(line.startswith("input.caption_col: 'text' is not a column") for line in lines), lines
    assert any(line.startswith("stages[1](dedup_semantic).eps: expected 0 <= eps < 2, got 3.0") for line in lines)
    assert any(line.startswith("stages[2](clip_score).pretrained: no file 'x.pt'") for line in lines)


def test_a_stage_placed_before_its_producer_is_told_where_to_go(tmp_path):
    _urls(tmp_path)
    clip = {"name": "clip_score", "model": "pf-tiny", "pretrained": str(SCORER)}
    job = load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "out"},
            "stages": ["download", "dedup_semantic", clip, "shard"],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"dedup_semantic.*'img_emb'.*clip_score declares it but runs after"):
        checks.check_job(job)
    # and in the right order the same job passes
    ok = load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "out"},
            "stages": ["download", clip, "dedup_semantic", "shard"],
        },
        base_dir=tmp_path,
    )
    assert checks.check_job(ok) == []


def test_keep_policy_and_language_columns_are_prerequisites(tmp_path):
    _urls(tmp_path)

    def job(*stages):
        return load_job(
            {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out"}, "stages": [*stages, "shard"]},
            base_dir=tmp_path,
        )

    with pytest.raises(ConfigError, match=r"dedup_exact\).*'clip_score'.*add a 'clip_score' stage"):
        checks.check_job(job("download", {"name": "dedup_exact", "keep": "clip_score"}))
    with pytest.raises(ConfigError, match=r"basic_filter\).*'lang'.*add a 'language' stage before it"):
        checks.check_job(job("download", {"name": "basic_filter", "languages": ["en"]}))
    with pytest.raises(ConfigError, match=r"dedup_exact\).*'sha256'.*add a 'download' stage"):
        checks.check_job(job("dedup_exact"))
    assert checks.check_job(job("download", "basic_filter", "dedup_exact", "dedup_phash")) == []


def test_a_cached_tag_passes_and_an_uncached_one_online_only_warns(tmp_path, monkeypatch):
    from huggingface_hub import constants

    reg = checks.pretrained_registry()
    tag = reg.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    repo = tag["hf_hub"].rstrip("/")
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(checks, "offline_reason", lambda: None)
    cfg = type("Cfg", (), {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})()
    problems, warnings = [], []
    checks.check_open_clip("s", cfg, problems, warnings)
    assert problems == [] and len(warnings) == 1 and "not in the local cache" in warnings[0]
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    problems, warnings = [], []
    checks.check_open_clip("s", cfg, problems, warnings)
    assert problems == [] and warnings == []
    assert checks.cached_weights(reg, tag) == str(snap / "open_clip_model.safetensors")


def test_offline_is_told_without_a_request(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert checks.offline_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class NoRoute:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def connect(self, addr):
            raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(checks.socket, "socket", NoRoute)
    assert checks.offline_reason() == "no route to the internet"


def test_the_registries_read_without_open_clip_match_open_clip():
    """The light readers of open_clip's registries (no torch import) agree
    with open_clip itself, and the columns clip_score declares without being
    built (``declares_columns``, for the job check's hints) with its outputs."""
    light_models = checks.open_clip_models()
    light_tags = checks.pretrained_registry().list_pretrained()
    code = (
        "import json, open_clip; from stages.common.clip import register_model_configs; register_model_configs();"
        "from stages.clip_score import ClipScoreStage, Config;"
        "cols = [c.name for c in ClipScoreStage(Config(pretrained='random', model='pf-tiny')).outputs()];"
        "print(json.dumps([open_clip.list_models(), open_clip.list_pretrained(), cols]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    models, tags, cols = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(light_models) == models
    assert [list(t) for t in light_tags] == tags
    from pairforge.stages.clip_score import ClipScoreStage

    assert set(ClipScoreStage.column_names()) == set(cols)
    assert {c for c, s in checks.producers().items() if s == "clip_score"} == set(cols)


def test_the_demo_job_passes(tmp_path):
    from pairforge.demo import demo_stages

    _urls(tmp_path)
    job = load_job(
        {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out"}, "stages": demo_stages(SCORER)},
        base_dir=tmp_path,
    )
    assert checks.check_job(job) == []


def test_a_stage_with_a_problem_does_not_make_the_ones_after_it_fail_too(tmp_path):
    _urls(tmp_path)
    clip = {"name": "clip_score", "model": "ViT-B-33", "pretrained": "random"}
    job = load_job(
        {
            "input": {"paths": ["urls.parquet"]},
            "output": {"dir": "out"},
            "stages": ["download", clip, "dedup_semantic", "shard"],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as e:
        checks.check_job(job)
    assert str(e.value).splitlines() == [
        "stages[1](clip_score).model: 'ViT-B-33' is not an open_clip model (did you mean 'ViT-B-32', 'ViT-S-32', 'ViT-M-32'?)"
    ]
