"""Opt-out and takedown lists (stages/common/blocklist*.py): every entry kind,
auto detection, comments and line numbers, parquet and CSV columns, the
normal forms (the column functions held to the scalar ones), pHash distance
against a brute-force search, bad lines, and pickling (a real spawned
process builds its own index)."""

import multiprocessing
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.stages.common.blocklist import Blocklists, ListConfig, ListError
from pairforge.stages.common.blocklist_norm import classify, normalize_domains, normalize_url, normalize_urls
from pairforge.stages.common.blocklist_read import SHOW_BAD, read_list

SHA = "a" * 63 + "b"
MIXED = f"""# takedowns, 2024-05
HTTP://Example.COM:80/a.jpg#frag

prefix:https://img.site.org/private/
evil.net   # a whole domain
ab12cd34ef56ab78
sha256:{SHA.upper()}
domain:localhost
url:https://example.com:8443/b.png?size=2
"""


def _write(tmp_path, text: str, name: str = "takedowns.txt") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_every_kind_detected_with_its_line(tmp_path):
    path = _write(tmp_path, MIXED)
    e = read_list(path)
    assert e.values == {
        "url": ["http://example.com/a.jpg", "https://example.com:8443/b.png?size=2"],
        "prefix": ["https://img.site.org/private/"],
        "domain": ["evil.net", "localhost"],
        "sha256": [SHA],
        "phash": ["ab12cd34ef56ab78"],
    }
    assert e.lines == {"url": [2, 9], "prefix": [4], "domain": [5, 8], "sha256": [7], "phash": [6]}
    assert e.skipped == 2  # the comment and the blank line
    b = Blocklists([{"path": path, "reason": "opted_out", "max_distance": 2}])
    [info] = b.lists
    assert info["name"] == "takedowns" and info["entries"] == {
        "url": 2,
        "prefix": 1,
        "domain": 2,
        "sha256": 1,
        "phash": 1,
    }
    m = b.match_url("http://EXAMPLE.com/a.jpg#other")
    assert m.reason == "opted_out"
    assert m.detail == {"list": "takedowns", "line": 2, "entry": "http://example.com/a.jpg", "kind": "url"}
    assert b.match_url("http://example.com/a.jpg?x") is None  # the query is part of the URL
    assert b.match_url("https://example.com:8443/b.png?size=2").detail["line"] == 9
    assert b.match_url("https://example.com/b.png?size=2") is None  # another port
    assert b.match_url("https://img.site.org/private/x/y.jpg").detail["kind"] == "prefix"
    assert b.match_url("http://img.site.org/private/x.jpg") is None  # a prefix keeps its scheme
    assert b.match_url("https://img.site.org/privat") is None
    assert b.match_url("http://cdn.EVIL.net./x").detail == {
        "list": "takedowns",
        "line": 5,
        "entry": "evil.net",
        "kind": "domain",
    }
    assert b.match_url("http://notevil.net/x") is None and b.match_url("http://evil.net.example/x") is None
    assert b.match_url("http://localhost:8080/") is not None
    assert b.match_sha256(SHA.upper()).detail["line"] == 7 and b.match_sha256("c" * 64) is None
    m = b.match_phash("ab12cd34ef56ab7b")  # 2 bits off
    assert m.detail == {"list": "takedowns", "line": 6, "entry": "ab12cd34ef56ab78", "kind": "phash", "distance": 2}
    assert b.match_phash("ab12cd34ef56ab77") is None  # 4 bits off
    for nothing in (None, "", "not a url", "ftp://example.com/a.jpg", 3.5):
        assert b.match_url(nothing) is None and b.match_sha256(nothing) is None and b.match_phash(nothing) is None


def test_config_kind_reads_unprefixed_lines_and_a_prefix_wins(tmp_path):
    path = _write(tmp_path, "example.com\nsub.example.org\nurl:http://example.net/x\n")
    e = read_list(path, kind="domain")
    assert e.values["domain"] == ["example.com", "sub.example.org"] and e.values["url"] == ["http://example.net/x"]
    e = read_list(_write(tmp_path, "http://a.example/img/\n", "p.txt"), kind="prefix")
    assert e.values["prefix"] == ["http://a.example/img/"]
    with pytest.raises(ListError, match=r"p2.txt:1: 'example.com': a sha256 is 64 hex digits"):
        read_list(_write(tmp_path, "example.com\n", "p2.txt"), kind="sha256")


@pytest.mark.parametrize(
    "url, normal",
    [
        ("HTTP://Example.COM:80/A.jpg#frag", "http://example.com/A.jpg"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:0443/x", "https://example.com/x"),
        ("http://example.com:8080/x?b=1&a=2", "http://example.com:8080/x?b=1&a=2"),
        ("http://example.com/x?", "http://example.com/x"),
        ("http://example.com?q", "http://example.com/?q"),
        ("http://user:pw@Example.com/x", "http://example.com/x"),
        ("http://example.com./x", "http://example.com/x"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://127.0.0.1:80/x", "http://127.0.0.1/x"),
        ("http://Bücher.de/x", "http://xn--bcher-kva.de/x"),
        ("  http://example.com/a b  ", "http://example.com/a b"),
        ("http://example.com:99999/", None),
        ("http://exa mple.com/", None),
        ("http://-bad-.com/", None),
        ("mailto:a@example.com", None),
        ("//example.com/x", None),
        ("", None),
    ],
)
def test_url_normal_form(url, normal):
    assert normalize_url(url) == normal
    assert normalize_urls([url]) == [normal]  # the column form answers the same


def test_column_and_scalar_forms_agree_on_odd_urls():
    rng = random.Random(3)
    parts = ["http://", "HTTPS://", "https://", "ftp://", "http:/"]
    hosts = ["Example.com", "a.b.c", "xn--bcher-kva.de", "bücher.de", "[::1]", "1.2.3.4", "x_y.z", "-a.b", "a..b", ""]
    ports = ["", ":80", ":443", ":8080", ":00080", ":65536", ":x"]
    tails = ["", "/", "/a/b", "/a?b", "?q", "#f", "/a#f?x", "/a b", "/a\\b", "/%41?%42"]
    urls = [rng.choice(parts) + rng.choice(hosts) + rng.choice(ports) + rng.choice(tails) for _ in range(3000)]
    urls += [None, 7]
    assert normalize_urls(urls) == [normalize_url(u) for u in urls]
    domains = ["Example.COM.", "*.example.com", ".example.com", "::1", "bücher.de", "a/b", "a..b", "x", " x.y "]
    from pairforge.stages.common.blocklist_norm import normalize_domain

    assert normalize_domains(domains) == [normalize_domain(d) for d in domains]
    kinds, norms = classify(
        pa.array(["http://a.b/x", SHA, "ab12cd34ef56ab78", "a.b", "nothing", "url:", "PHASH:ab12cd34ef56ab78"])
    )
    assert kinds.tolist() == [0, 3, 4, 2, -1, 0, 4] and norms[4] is None and norms[5] is None


def test_bad_lines_fail_the_list_naming_file_and_line(tmp_path):
    path = _write(tmp_path, "http://ok.example/a\nnot an entry\nsha256:1234\n# fine\nexample\n")
    with pytest.raises(ListError) as e:
        read_list(path)
    msg = str(e.value)
    assert "3 line(s) that are no entry" in msg
    assert f"{path}:2: 'not an entry': not a URL" in msg
    assert f"{path}:3: 'sha256:1234': a sha256 is 64 hex digits" in msg
    assert f"{path}:5: 'example'" in msg  # a bare word is no host: a domain needs domain: or a dot
    many = _write(tmp_path, "\n".join(f"bad{i}" for i in range(SHOW_BAD + 5)), "many.txt")
    with pytest.raises(ListError, match=r"\.\.\. and 5 more"):
        read_list(many)
    with pytest.raises(ListError, match="cannot read the list"):
        read_list(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("http://ex.com/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ListError, match="not UTF-8"):
        read_list(str(tmp_path / "latin1.txt"))


def test_parquet_and_csv_columns_with_row_numbers(tmp_path):
    pq.write_table(
        pa.table({"id": [1, 2, 3, 4], "u": ["http://a.example/1", None, "", "b.example"]}), tmp_path / "l.parquet"
    )
    e = read_list(str(tmp_path / "l.parquet"), column="u")
    assert e.values["url"] == ["http://a.example/1"] and e.lines["url"] == [1]
    assert e.values["domain"] == ["b.example"] and e.lines["domain"] == [4] and e.skipped == 2
    with pytest.raises(ListError, match=r"column: expected the name of one of \['id', 'u'\], got None"):
        read_list(str(tmp_path / "l.parquet"))
    with pytest.raises(ListError, match=r"column: expected one of \['id', 'u'\], got 'url'"):
        read_list(str(tmp_path / "l.parquet"), column="url")
    # a pHash of decimal digits stays text (leading zeros kept), and a CSV's only column needs no name
    (tmp_path / "h.csv").write_text("phash\n0012345678901234\n\nffffffffffffffff\n")
    e = read_list(str(tmp_path / "h.csv"))
    assert e.values["phash"] == ["0012345678901234", "ffffffffffffffff"]
    b = Blocklists([{"path": str(tmp_path / "h.csv"), "max_distance": 1}])
    assert b.match_phash("0012345678901235").detail["line"] == 1


def test_phash_distance_matches_a_brute_force_search(tmp_path):
    rng = np.random.default_rng(0)
    n = 20_000
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    path = _write(tmp_path, "".join(f"{int(h):016x}\n" for h in hashes), "ph.txt")
    queries = []
    for i in range(400):  # near an entry (0..14 bits flipped) or anywhere
        h = int(hashes[rng.integers(n)])
        for b in rng.choice(64, int(rng.integers(0, 15)), replace=False):
            h ^= 1 << int(b)
        queries.append(h if i % 4 else int(rng.integers(0, 2**63)) * 2)
    q = np.array(queries, dtype=np.uint64)
    dist = np.bitwise_count(q[:, None] ^ hashes[None, :])
    for d in (0, 3, 8, 12):
        b = Blocklists([ListConfig(path=path, name=f"d{d}", max_distance=d)])
        got = b.match_phashes([f"{h:016x}" for h in queries])
        for i, m in enumerate(got):
            best = int(dist[i].min())
            if best > d:
                assert m is None, (d, i)
                continue
            first = int(np.flatnonzero(dist[i] == best)[0])  # the nearest, then the first line
            assert m.detail["distance"] == best and m.detail["line"] == first + 1, (d, i)


def test_lists_in_order_reason_per_list_and_the_most_specific_entry(tmp_path):
    a = _write(tmp_path, "prefix:http://s.example/a/\nprefix:http://s.example/a/b/\ns.example\n", "a.txt")
    b = _write(tmp_path, "http://s.example/a/b/c.jpg\n", "b.txt")
    lists = Blocklists([{"path": a, "reason": "blocklisted"}, {"path": b, "reason": "opted_out"}])
    m = lists.match_url("http://s.example/a/b/c.jpg")
    assert (m.reason, m.detail["list"], m.detail["line"]) == ("blocklisted", "a", 2)  # first list, longest prefix
    assert lists.match_url("http://x.s.example/z").detail["kind"] == "domain"
    assert (
        Blocklists([{"path": b, "reason": "opted_out"}, a]).match_url("http://s.example/a/b/c.jpg").reason
        == "opted_out"
    )
    rows = lists.match_rows(urls=["http://other.example/", None], sha256s=[None, SHA], phashes=[None, None])
    assert rows == [None, None]
    with pytest.raises(ValueError, match="name: expected a name per list"):
        Blocklists([a, a])


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"path": "x", "reason": "gone"}, "reason: expected one of ('opted_out', 'blocklisted'), got 'gone'"),
        ({"path": "x", "kind": "hash"}, "kind: expected auto or one of"),
        ({"path": "x", "max_distance": 17}, "max_distance: expected an integer in 0..16, got 17"),
        ({"path": ""}, "path: expected the path of a list file, got ''"),
        ({"path": "x", "colum": "u"}, "lists: expected only the keys"),
    ],
)
def test_config_errors_name_key_and_value(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Blocklists([cfg])


def _match_in_child(blob: bytes, url: str):
    lists = pickle.loads(blob)
    m = lists.match_url(url)
    return m.detail if m else None


def test_pickles_as_its_configs_and_builds_once_per_process(tmp_path):
    path = _write(tmp_path, "".join(f"http://h{i}.example/{i}.jpg\n" for i in range(50_000)), "big.txt")
    lists = Blocklists([path]).load()
    blob = pickle.dumps(lists)
    assert len(blob) < 1000  # the configs, not 50,000 entries
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: another str hash seed, no cache
    with ctx.Pool(1) as pool:
        got = pool.apply(_match_in_child, (blob, "http://H123.example/123.jpg"))
    assert got == {"list": "big", "line": 124, "entry": "http://h123.example/123.jpg", "kind": "url"}
    assert Blocklists([path]).load()._index is lists._index  # one index per process for the same files


def test_a_large_list_answers_like_a_set(tmp_path):
    rng = random.Random(1)
    entries = [f"https://h{rng.randrange(5000)}.example/{i}.jpg" for i in range(100_000)]
    path = _write(tmp_path, "\n".join(entries) + "\n", "large.txt")
    lists = Blocklists([path])
    queries = [rng.choice(entries) if i % 3 == 0 else f"https://h{i}.example/{i}.png" for i in range(20_000)]
    want = set(entries)
    assert [m is not None for m in lists.match_urls(queries)] == [q in want for q in queries]
