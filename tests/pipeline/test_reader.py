import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.pipeline.config import ConfigError, InputConfig
from pairforge.pipeline.reader import split_input


def _rows(n, start=0):
    return [
        {"url": f"http://h/{i}.jpg", "text": f"cap {i}", "status": "x", "score": i} for i in range(start, start + n)
    ]


def _write(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_formats_split_into_shards_with_stable_keys(tmp_path, fmt):
    _write(tmp_path / f"a.{fmt}", _rows(7), fmt)
    _write(tmp_path / f"b.{fmt}", _rows(5, 7), fmt)
    cfg = InputConfig(paths=(str(tmp_path / f"*.{fmt}"),), caption_col="text")
    idx = split_input(cfg, tmp_path / "out", samples_per_shard=4)
    assert idx.total_rows == 12 and idx.shard_rows == {0: 4, 1: 4, 2: 4}
    t = pa.concat_tables([pq.read_table(layout.input_shard(tmp_path / "out", s)) for s in range(3)])
    assert t.column("key").to_pylist()[:5] == ["000000", "000001", "000002", "000003", "000010"]
    assert t.column("url").to_pylist() == [f"http://h/{i}.jpg" for i in range(12)]
    assert t.column("caption").to_pylist()[11] == "cap 11"
    assert set(t.column("status").to_pylist()) == {"ok"}
    # extra columns are carried; one that collides with ours is renamed, not lost
    assert t.column("input_status").to_pylist()[0] == "x"
    assert [str(v) for v in t.column("score").to_pylist()] == [str(i) for i in range(12)]
    assert t.column("source").to_pylist()[0] == "a" and t.column("source").to_pylist()[-1] == "b"


def test_missing_column_is_a_clear_error(tmp_path):
    _write(tmp_path / "a.parquet", _rows(3), "parquet")
    cfg = InputConfig(paths=(str(tmp_path / "a.parquet"),))
    with pytest.raises(ConfigError, match="no column 'caption' .*columns are: url, text"):
        split_input(cfg, tmp_path / "out", 10)


def test_null_urls_and_captions_become_empty_rows_not_losses(tmp_path):
    pq.write_table(pa.table({"url": ["http://a", None], "caption": [None, "b"]}), tmp_path / "a.parquet")
    idx = split_input(InputConfig(paths=(str(tmp_path / "a.parquet"),)), tmp_path / "o", 10)
    t = pq.read_table(layout.input_shard(tmp_path / "o", 0))
    assert idx.total_rows == 2
    assert t.column("url").to_pylist() == ["http://a", ""] and t.column("caption").to_pylist() == ["", "b"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        split_input(InputConfig(paths=(str(tmp_path / "*.csv"),)), tmp_path / "o", 10)


def test_a_parquet_url_list_is_read_a_row_group_at_a_time(tmp_path):
    """Issue 30: the reader's Arrow memory is about one row group, not the
    file (pyarrow's pre-buffering read ahead every row group's bytes)."""
    import os

    from pairforge.pipeline.reader import iter_batches

    path = tmp_path / "urls.parquet"
    groups, per = 24, 20_000
    with pq.ParquetWriter(path, pa.schema([("url", pa.string())]), compression="none") as w:
        for _ in range(groups):  # random text: each group's bytes are its own
            urls = [f"http://h/{os.urandom(16).hex()}.jpg" for _ in range(per)]
            w.write_table(pa.table({"url": urls}), row_group_size=per)
    group_bytes = os.path.getsize(path) / groups
    peak, rows = 0, 0
    for batch in iter_batches(path, "parquet"):
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes())
    assert rows == groups * per
    assert peak < 6 * group_bytes, (peak, group_bytes)  # the whole file is 24 groups
