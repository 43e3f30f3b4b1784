"""``pairforge demo`` as a user runs it: each stage visibly does its job, the
regions stage included (issue 28, finding 7: the shipped detector boxed 6 of
290 kept rows; it must box at least a third), and the demo exits with
``pairforge run``'s codes (``pipeline/outcome.py``, docs/troubleshooting.md).

The whole demo is built once a session (``demo_run`` in tests/conftest.py,
shared with tests/manifests/test_purge.py). The exit codes of a failed demo are checked
on a real run of a small corpus of URLs that all fail, served by the demo's
own server: seconds, no Ray.
"""

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.cli import main
from pairforge.manifests.report import REGION_EXAMPLES
from pairforge.pipeline import outcome
from pairforge.pipeline.datasets import FASHION_CLASSES
from pairforge.pipeline.httpserver import Route

#: issue 28: the report's regions section shows boxes on at least this share of the kept rows
REGIONS_SHARE = 1 / 3


def _kept(run) -> list[dict]:
    files = sorted((run / "shards").glob("*.parquet"))
    cols = ["url", "caption", "num_regions", "region_labels"]
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pylist()


@pytest.mark.slow
def test_the_demo_exits_0_and_boxes_regions_on_a_third_of_its_kept_rows(demo_run):
    rc, run = demo_run
    assert rc == outcome.EXIT_OK
    rows = _kept(run)
    boxed = collections.Counter(r["url"].split("/")[3] for r in rows if r["num_regions"] > 0)
    kinds = collections.Counter(r["url"].split("/")[3] for r in rows)
    assert len(rows) >= 250, kinds
    assert sum(boxed.values()) >= REGIONS_SHARE * len(rows), (boxed, kinds)
    # the product photos (Fashion-MNIST t10k items: none of them trained on) are what the detector finds
    assert boxed["fashion"] >= 0.6 * kinds["fashion"], (boxed, kinds)
    # and it names them: the best box's class is the one the caption names on most product photos
    named = [r for r in rows if r["url"].split("/")[3] == "fashion" and r["num_regions"] > 0]
    right = sum(r["region_labels"][0] in r["caption"] for r in named)  # "shirt" is in "t-shirt": a lenient count
    assert all(r["region_labels"][0] in (*FASHION_CLASSES, "face") for r in named)
    assert right >= 0.5 * len(named), (right, len(named))
    # the report the demo writes shows them: its regions section draws its full count of examples
    drawn = list((run / "report" / "img").glob("*.regions.png"))
    assert len(drawn) == REGION_EXAMPLES, drawn


def _all_fail(seed: int = 0):
    """A corpus of URLs that all answer 404: every row ends in the rejects."""
    routes = {f"/gone/{i}.jpg": Route(b"no", "text/plain", status=404) for i in range(6)}
    return routes, [{"path": p, "caption": "a picture that will not arrive", "planted": "failure"} for p in routes]


def test_a_demo_that_keeps_nothing_exits_3_and_one_that_cannot_run_2(tmp_path, monkeypatch, capsys):
    import pairforge.demo

    monkeypatch.setattr(pairforge.demo, "build_corpus", _all_fail)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--runner", "local"]) == outcome.EXIT_NO_SAMPLES == 3
    err = capsys.readouterr().err
    assert "No row reached a shard (exit 3)" in err and "http_404" in err
    # the same folder again: the run is refused before it starts, as `pairforge run` refuses it
    assert main(["demo", "--out", str(out), "--runner", "local"]) == outcome.EXIT_CONFIG == 2
    assert "already holds a run" in capsys.readouterr().err
