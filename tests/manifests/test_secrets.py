"""Issue 29, finding 8: credentials never reach what a run records (the
manifest, ``_work/job.json``, log lines, error messages)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main as cli_main
from pairforge.manifests import layout
from pairforge.manifests.redact import redact, redact_text
from pairforge.manifests.storage import StorageConfig
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.pipeline.job import run_job

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "text, expect",
    [
        (f"http://user:{SECRET}@minio.local:9000", "http://***@minio.local:9000"),
        (f"https://{SECRET}@h/x?a=1", "https://***@h/x?a=1"),
        (f"see s3+http://ak:{SECRET}@h and ftp://u@h2/p", "see s3+http://***@h and ftp://***@h2/p"),
        (
            f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature={SECRET}&x=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        (f"http://h/p?token={SECRET}#f", "http://h/p?token=***#f"),
        ("http://h/a@b", "http://h/a@b"),  # an @ in the path is not user information
        ("mail me: a@b.c, key=value", "mail me: a@b.c, key=value"),
    ],
)
def test_redact_text(text, expect):
    assert redact_text(text) == expect


def test_redact_walks_records_and_leaves_the_input_alone():
    rec = {
        "storage": {"endpoint_url": f"http://u:{SECRET}@h"},
        "stages": [{"name": "x", "urls": (f"http://a:{SECRET}@b",)}],
    }
    out = redact(rec)
    assert SECRET not in json.dumps(out) and SECRET in json.dumps(rec)
    assert out["stages"][0]["urls"] == ("http://***@b",)


def test_an_endpoint_url_with_credentials_is_refused_without_repeating_them(tmp_path):
    """The review's probe: such an endpoint_url was written to manifest.json as it was."""
    with pytest.raises(ValueError) as e:
        StorageConfig(endpoint_url=f"http://minio:{SECRET}@127.0.0.1:9000")
    assert SECRET not in str(e.value) and "http://***@127.0.0.1:9000" in str(e.value)
    pq.write_table(pa.table({"url": ["http://h/0"], "caption": ["c"]}), tmp_path / "u.parquet")
    raw = {
        "input": {"paths": ["u.parquet"]},
        "output": {"dir": "out"},
        "stages": ["shard"],
        "runner": "local",
        "storage": {"endpoint_url": f"http://minio:{SECRET}@127.0.0.1:9000"},
    }
    with pytest.raises(ConfigError) as e:
        load_job(raw, base_dir=tmp_path)
    assert SECRET not in str(e.value) and "storage.endpoint_url" in str(e.value)
    (tmp_path / "job.yaml").write_text(json.dumps(raw))
    assert cli_main(["manifest", "show", str(tmp_path), "--endpoint-url", f"http://k:{SECRET}@h:1"]) == 2


def test_the_cli_and_the_log_never_print_a_secret(tmp_path, capsys):
    pq.write_table(pa.table({"url": ["http://h/0"], "caption": ["c"]}), tmp_path / "u.parquet")
    raw = {
        "input": {"paths": ["u.parquet"]},
        "output": {"dir": "out"},
        "stages": ["shard"],
        "runner": "local",
        "storage": {"endpoint_url": f"http://minio:{SECRET}@127.0.0.1:9000"},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(raw))
    assert cli_main(["run", str(tmp_path / "job.yaml")]) == 2
    assert cli_main(["manifest", "show", "s3://bucket/run", "--endpoint-url", f"http://k:{SECRET}@h:1"]) == 2
    err = capsys.readouterr().err
    assert "endpoint_url" in err and SECRET not in err


def test_the_manifest_and_the_job_record_hold_no_secret(tmp_path):
    """A stage option holding a URL with credentials (any string option of
    any stage goes the same way) reaches manifest.json and job.json masked."""
    from pairforge.manifests.manifest import build_manifest
    from pairforge.pipeline import workdir

    # 127.0.0.1 without allow_networks: refused before any connection
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["c"]}), tmp_path / "u.parquet")
    job = load_job(
        {
            "input": {"paths": ["u.parquet"]},
            "output": {"dir": "out"},
            "stages": [{"name": "download", "contact": f"https://u:{SECRET}@h/bot"}, "shard"],
            "runner": "local",
        },
        base_dir=tmp_path,
    )
    man = run_job(job)
    text = layout.manifest_json(tmp_path / "out").read_text()
    assert SECRET not in text and "https://***@h/bot" in text and SECRET not in json.dumps(man["job"])
    assert SECRET not in layout.job_record(tmp_path / "out").read_text()
    assert SECRET not in json.dumps(workdir.job_record(job))
    index = {"total_rows": 0, "files": [{"path": f"s3://b/k?X-Amz-Signature={SECRET}"}]}
    built = build_manifest(tmp_path / "empty", {"x": f"http://a:{SECRET}@b"}, index, [], [], {}, {})
    assert SECRET not in json.dumps(built)
