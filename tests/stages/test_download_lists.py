"""Opt-out and takedown lists in the download stage: a URL on a list is
never requested; an image whose bytes' sha256 or stored pHash is on one is
rejected after its fetch; each row names the list and the line."""

from __future__ import annotations

import hashlib
import json

from pairforge.stages.base import STATUS_OK
from pairforge.stages.common.phash import image_hash
from pairforge.stages.download import Config, DownloadStage
from tests.downloadkit import make_batch
from tests.hostsim import HostSim, Rule, addresses
from tests.shardkit import jpeg

LOCAL = ("127.0.0.0/8",)


def test_lists_reject_rows_before_and_after_the_fetch(tmp_path):
    a, b = addresses(2, second=76)
    image = jpeg(64, 48)
    with HostSim({a: Rule(), b: Rule()}, image) as sim:
        urls = [
            sim.url(a, "/img/keep.jpg"),
            sim.url(a, "/private/x.jpg"),  # prefix
            sim.url(b, "/img/y.jpg"),  # domain
        ]
        plain = DownloadStage(Config(allow_networks=LOCAL, image_size=32))
        first = plain.process_batch(make_batch(urls[:1]))
        stored_phash = image_hash(first["image"][0], "phash")
        (tmp_path / "takedown.txt").write_text(f"# takedowns\nprefix:{sim.url(a, '/private/')}\ndomain:{b}\n")
        (tmp_path / "hashes.txt").write_text(f"sha256:{hashlib.sha256(image).hexdigest()}\n")
        (tmp_path / "phash.txt").write_text(f"phash:{stored_phash}\n")
        before = {ip: len(sim.scores[ip].arrivals) for ip in (a, b)}
        lists = [
            {"path": str(tmp_path / "takedown.txt"), "reason": "blocklisted"},
            {"path": str(tmp_path / "hashes.txt"), "name": "csam-hashes"},
        ]
        out = DownloadStage(Config(allow_networks=LOCAL, image_size=32, lists=lists)).process_batch(make_batch(urls))
        by_phash = DownloadStage(
            Config(
                allow_networks=LOCAL,
                image_size=32,
                lists=[{"path": str(tmp_path / "phash.txt"), "reason": "opted_out"}],
            )
        ).process_batch(make_batch(urls[:1]))
        requested = {ip: [p for _, p in sim.scores[ip].arrivals[before[ip] :]] for ip in (a, b)}
    assert first["status"][0] == STATUS_OK
    assert list(out["reason"]) == ["blocklisted", "blocklisted", "blocklisted"]
    d = [json.loads(x) for x in out["detail"]]
    assert (d[0]["list"], d[0]["line"], d[0]["kind"]) == ("csam-hashes", 1, "sha256")  # fetched, then matched
    assert (d[1]["list"], d[1]["line"], d[1]["kind"]) == ("takedown", 2, "prefix")
    assert (d[2]["list"], d[2]["line"], d[2]["kind"]) == ("takedown", 3, "domain")
    assert "/private/x.jpg" not in requested[a] and requested[b] == []  # never fetched
    assert by_phash["reason"][0] == "opted_out" and json.loads(by_phash["detail"][0])["kind"] == "phash"


def test_a_bad_list_is_a_config_error_naming_the_key(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"lists: .*reason"):
        Config(lists=[{"path": "x.txt", "reason": "nope"}])
