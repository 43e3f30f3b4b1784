"""What ``pipeline/`` knows of a stage it learns from the stage itself
(issue 27): the open_clip check follows the options a stage names
(``Stage.open_clip_options``), the job check's "add a ... stage" hint the
columns a stage declares (``Stage.column_names``), a shared decode the
stages that want and give one (``Stage.wants_decoded`` / ``give_decoded`` /
``take_decoded``), the warnings about the URL lists' first rows the stages
that read them (``Stage.input_warnings``), and the check of an earlier build
the stages that read one (``Stage.check``). Stages of one's own show that
nothing in ``pipeline/`` names a built-in stage for it."""

from __future__ import annotations

import dataclasses

import pytest

from pairforge.pipeline.checks import check_job
from pairforge.pipeline.checks_columns import producers
from pairforge.pipeline.config import ConfigError, JobConfig, load_job
from pairforge.stages import STAGES, stage_class
from pairforge.stages.base import Column, Stage
from pairforge.stages.download import DownloadStage
from pairforge.stages.metadata_match import MetadataMatchStage
from pairforge.stages.options import options


@options
class ScorerConfig:
    #: an open_clip architecture, under a name of this stage's own
    arch: str = "ViT-B-32"
    #: its weights
    weights: str = "random"


class OwnScorer(Stage):
    """Names open_clip weights in options called otherwise than clip_score's."""

    name = "own_scorer"
    Config = ScorerConfig
    open_clip_options = ("arch", "weights")

    def process_batch(self, batch):
        return batch


@options
class HashReaderConfig:
    #: which hash to read
    algorithm: str = "dhash"
    #: the column to read it from; ``None``: hash the image itself
    hash_column: str | None = None


class HashReader(Stage):
    """Wants a perceptual hash, as dedup_phash does, under a name of its own."""

    name = "hash_reader"
    Config = HashReaderConfig

    @classmethod
    def wants_decoded(cls, config):
        return config.algorithm if config.hash_column is None else None

    @classmethod
    def take_decoded(cls, config, value):
        return dataclasses.replace(config, hash_column=value)

    def outputs(self):
        return (Column("hash_seen", "string"),)

    def process_batch(self, batch):
        return {**batch, "hash_seen": batch[self.config.hash_column]}


def _job(tmp_path, *stages):
    return JobConfig(input=str(tmp_path / "u.parquet"), output=str(tmp_path / "out"), stages=[*stages, "shard"])


def test_the_open_clip_check_follows_the_options_a_stage_names(tmp_path):
    job = _job(tmp_path, OwnScorer(arch="ViT-B-23"))
    with pytest.raises(ConfigError) as e:
        check_job(job)
    where = f"stages[0]({OwnScorer.__module__}:OwnScorer)"
    assert f"{where}.arch: 'ViT-B-23' is not an open_clip model (did you mean 'ViT-B-32'" in str(e.value)
    job = _job(tmp_path, OwnScorer(weights="no/such/file.pt"))
    with pytest.raises(ConfigError) as e:
        check_job(job)
    assert f"{where}.weights: no file 'no/such/file.pt'" in str(e.value)
    # a stage that names no weights is not checked for them, whatever its options are called
    assert Stage.open_clip_options is None and DownloadStage.open_clip_options is None


def test_a_stage_of_ones_own_shares_downloads_decode(tmp_path):
    job = _job(tmp_path, "download", HashReader())
    assert job.stages[0].config.perceptual_hash == "dhash" and job.stages[1].config.hash_column == "dhash"
    # its own setting wins; and a hash download already computes for another stage is not swapped
    job = _job(tmp_path, "download", HashReader(hash_column="mine"))
    assert job.stages[0].config.perceptual_hash is None and job.stages[1].config.hash_column == "mine"
    job = _job(tmp_path, "download", "dedup_phash", HashReader())
    assert job.stages[0].config.perceptual_hash == "phash" and job.stages[1].config.hash_column == "phash"
    assert job.stages[2].config.hash_column is None
    # no stage before it that stores images: it hashes them itself
    assert _job(tmp_path, HashReader(), "download").stages[0].config.hash_column is None


def test_a_custom_stage_in_a_job_file_shares_the_decode_once_imported(tmp_path):
    from pairforge.pipeline.config import resolve_stages

    name = f"{HashReader.__module__}:HashReader"
    job = load_job({"input": {"paths": ["u.parquet"]}, "output": {"dir": "out"},
                    "stages": ["download", {"name": name}, "shard"]}, tmp_path)  # fmt: skip
    assert job.stages[0].config.perceptual_hash is None  # not imported yet: it takes no part
    job = resolve_stages(job)
    assert job.stages[0].config.perceptual_hash == "dhash" and job.stages[1].config.hash_column == "dhash"


def test_an_unknown_hash_is_the_stages_error_not_a_crash_of_the_loader(tmp_path):
    job = _job(tmp_path, "download", {"name": "dedup_phash", "algorithm": "xhash"})
    assert job.stages[0].config.perceptual_hash is None
    with pytest.raises(ConfigError, match=r"stages\[1\]\(dedup_phash\)\.algorithm: expected one of"):
        check_job(job)


def test_declared_column_names_are_what_the_built_stages_declare(tmp_path):
    """A stage that declares its columns without being built
    (``declares_columns``) declares what it outputs once built; the others'
    names come from building them. clip_score's: tests/pipeline/test_checks.py (it
    needs open_clip's registry)."""
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\n")
    built = MetadataMatchStage(entries=str(entries))
    assert MetadataMatchStage.column_names() == tuple(c.name for c in built.outputs())
    assert HashReader.column_names() == ("hash_seen",)
    assert OwnScorer.column_names() == ()
    for name in STAGES:
        cls = stage_class(name)
        if cls.declares_columns is None and name != "shard":
            try:
                st = cls()
            except (ValueError, TypeError):
                continue
            assert cls.column_names() == tuple(c.name for c in st.outputs()), name
    made = producers()
    assert (made["metadata_entries"], made["img_emb"], made["phash"]) == ("metadata_match", "clip_score", "dedup_phash")


@options
class CaptionWatchConfig:
    #: the shortest caption this stage keeps
    min_chars: int = 5


class CaptionWatch(Stage):
    """Warns, before a run, when the URL lists' captions are mostly too short for it."""

    name = "caption_watch"
    Config = CaptionWatchConfig

    def input_warnings(self, rows, where):
        short = sum(len(str(c)) < self.config.min_chars for c in rows["caption"])
        return [f"{short} short captions; lower {where}.min_chars"] if short > len(rows["caption"]) // 2 else []

    def process_batch(self, batch):
        return batch


def test_the_url_lists_first_rows_reach_every_stage_that_warns_about_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pairforge.pipeline.checks_urls import input_warnings
    from pairforge.pipeline.config import InputConfig
    from pairforge.pipeline.reader import split_input

    urls = [f"http://127.0.0.1/{i}.jpg" for i in range(6)] + ["http://example.com/x.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b", "c", "d", "e", "a dog", "x"]}), tmp_path / "u.parquet")
    out = tmp_path / "out"
    split_input(InputConfig(paths=(str(tmp_path / "u.parquet"),)), out, 3)
    stages = [DownloadStage(DownloadStage.Config()), CaptionWatch(), DownloadStage(allow_networks=["127.0.0.0/8"])]
    got = input_warnings(stages, out)
    assert len(got) == 2, got  # the second download allows loopback: nothing to say
    assert got[0].startswith("6 of the first 7 URLs point at addresses download refuses: loopback 6")
    assert "stages[0](download).allow_networks: ['127.0.0.0/8']" in got[0]
    assert got[1] == "6 short captions; lower stages[1](caption_watch).min_chars"


def test_a_prior_build_is_checked_by_the_stage_that_reads_it(tmp_path):
    from pairforge.pipeline.checks import check_stages

    for name in ("dedup_exact", "dedup_phash"):
        st = stage_class(name)(prior_build=str(tmp_path))
        assert check_stages([("stages[0]", st)]) == [
            f"stages[0].prior_build: {str(tmp_path)!r} holds no shards/*.parquet (not the OUT of an earlier run)"
        ]
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / "00000.parquet").write_bytes(b"")
        assert check_stages([("stages[0]", st)]) == []
        (tmp_path / "shards" / "00000.parquet").unlink()
    st = stage_class("dedup_exact")(prior_build="gs://bucket/old")
    assert check_stages([("stages[2](dedup_exact)", st)]) == [
        "stages[2](dedup_exact).prior_build: 'gs://bucket/old': an earlier build on object storage is not read yet; "
        "give a local copy of its shards/*.parquet"
    ]
