import pytest

from pairforge.pipeline.config import ConfigError, load_job


def _job(**over):
    d = {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out"}, "stages": ["shard"]}
    d.update(over)
    return d


def test_relative_paths_resolve_against_job_folder(tmp_path):
    job = load_job(_job(), base_dir=tmp_path)
    assert job.input.paths == (str(tmp_path / "urls.parquet"),)
    assert job.output.dir == str(tmp_path / "out")
    assert job.output.samples_per_shard == 10000


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"^outptu: unknown key, given \{\} \(did you mean 'output'\?\)$"):
        load_job(_job(outptu={}))


def test_unknown_nested_key_is_named():
    with pytest.raises(
        ConfigError, match=r"^output.samples_per_shards: unknown key, given 3 \(did you mean 'samples_per_shard'\?\)"
    ):
        load_job(_job(output={"dir": "o", "samples_per_shards": 3}))


def test_unknown_stage_option_is_named():
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\(shard\).write_embedings: unknown key.*did you mean 'write_embeddings'"
    ):
        load_job(_job(stages=[{"name": "shard", "write_embedings": False}]))


def test_unknown_stage_name_lists_known():
    with pytest.raises(
        ConfigError,
        match=r"stages\[0\]: unknown stage 'downlaod' \(did you mean 'download'\?\); known stages: .*dedup_phash",
    ):
        load_job(_job(stages=["downlaod", "shard"]))


def test_shard_must_be_last():
    with pytest.raises(ConfigError, match="last stage must be 'shard'"):
        load_job(_job(stages=["shard", "shard"]))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_job(_job(stages=[]))


def test_types_are_checked():
    with pytest.raises(ConfigError, match="^output.samples_per_shard: expected int, got 'many'"):
        load_job(_job(output={"dir": "o", "samples_per_shard": "many"}))


def test_yaml_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(
        "input: {paths: [a.csv], caption_col: text}\noutput: {dir: o, samples_per_shard: 5}\nstages: [shard]\n"
    )
    job = load_job(p)
    assert job.input.caption_col == "text" and job.output.samples_per_shard == 5
    assert job.stages[0].name == "shard" and job.stages[0].config.write_embeddings is True


def test_example_job_in_the_package_loads():
    from pathlib import Path

    from pairforge import pipeline

    path = Path(pipeline.__file__).parent / "example_job.yaml"
    job = load_job(str(path))
    names = [s.name for s in job.stages]
    assert names[0] == "download" and names[-1] == "shard" and "clip_score" in names
    assert job.input.paths[0] == str(path.resolve().parent / "urls.parquet")


@pytest.mark.parametrize(
    "name, stages",
    [
        ("example_metaclip_job.yaml", ["metadata_match", "download", "dedup_exact", "balance", "shard"]),
        ("example_align_job.yaml", ["align_text", "download", "dedup_exact", "shard"]),
    ],
)
def test_curation_example_jobs_load_and_pass_their_checks(name, stages):
    from pathlib import Path

    from pairforge import pipeline
    from pairforge.pipeline.checks import _build_stages
    from pairforge.pipeline.checks_columns import check_columns

    job = load_job(str(Path(pipeline.__file__).parent / name))
    assert [s.name for s in job.stages] == stages
    problems: list[str] = []
    built = _build_stages(job, problems)  # the WordNet entries make setup installs, read here
    assert problems == [] and check_columns(built, {"url", "caption", "key", "status", "stage"}) == []


def test_numbers_are_not_strings_or_booleans_and_pairs_have_two():
    def stage(**opts):
        return load_job(_job(stages=[{"name": "download", **opts}, "shard"]))

    with pytest.raises(
        ConfigError, match=r"stages\[0\]\(download\)\.timeout: expected a number, got '10' \(a string\)"
    ):
        stage(timeout="10")
    with pytest.raises(ConfigError, match=r"\.retries: expected int, got True \(a boolean\)"):
        stage(retries=True)
    with pytest.raises(ConfigError, match=r"\.retries: expected >= 0, got -3"):
        stage(retries=-3)
    assert stage(timeout=3).stages[0].config.timeout == 3.0  # a YAML int is a number
    with pytest.raises(ConfigError, match=r"\.concurrency: expected a list of 2 values, got \[1, 2, 3\]"):
        load_job(_job(stages=[{"name": "clip_score", "pretrained": "random", "concurrency": [1, 2, 3]}, "shard"]))


def test_every_bad_value_of_a_stage_is_named_and_only_those():
    """The config's own checks are tried key by key: three bad values are three
    lines, and a key whose check needs a companion the job gave is not blamed."""
    regions = {"name": "regions", "features": ["clip"], "clip_pretrained": "x.pt", "max_regions": 0, "nms_iou": 2.0}
    with pytest.raises(ConfigError) as e:
        load_job(_job(stages=["download", regions, {"name": "shard", "write_embedings": True}]))
    assert str(e.value).splitlines() == [
        "stages[1](regions).max_regions: expected >= 1, got 0",
        "stages[1](regions).nms_iou: expected an IoU in (0, 1], got 2.0",
        "stages[2](shard).write_embedings: unknown key, given True (did you mean 'write_embeddings'?)",
    ]
    with pytest.raises(ConfigError, match=r"^stages\[1\]\(regions\).clip_pretrained: expected a CLIP checkpoint"):
        load_job(_job(stages=["download", {"name": "regions", "features": ["clip"]}, "shard"]))


def test_a_tilde_path_of_no_user_is_a_config_error():
    # hypothesis found it (tests/pipeline/test_fuzz_inputs.py): Path("~0").expanduser() raises RuntimeError
    with pytest.raises(ConfigError, match=r"input.paths: '~0': no home folder"):
        load_job({"input": "~0", "output": {"dir": "out"}, "stages": ["shard"]})
