"""``pairforge report`` on a real small run, read back as a browser reads it.

The run: real photos, an exact copy, a re-encode, Winoground-style scene
pairs, a 404 and captions holding ``<script>``, downloaded from a local HTTP
server and run through every stage with the in-process runner (the
project's scorer, the pf-tiny detector, confounders). The page is checked
as markup (every ``<img>`` is a file under the report or a ``data:`` URI,
nothing points off the machine, captions are escaped) and in headless
Chromium: ``--dump-dom`` and ``--screenshot`` as a person would run them,
and a DevTools-protocol session (aiohttp's websocket client, a dependency
already) that collects console messages, exceptions and failed loads and
asks every image whether it decoded. A tiny broken page shows that check
does see errors.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pairforge.demo import SCORER_CHECKPOINT, _jpeg
from pairforge.manifests.manifest import read_manifest
from pairforge.pipeline.config import load_job
from pairforge.pipeline.datasets import skimage_photos
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.trainer import scenes

PAIRFORGE = str(Path(sys.executable).parent / "pairforge")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: a kept caption and a rejected one, as the web might send them
KEPT_SCRIPT = 'portrait of an astronaut in a white space suit <script>alert("kept")</script>'
REJECTED_SCRIPT = "</td><script>alert(1)</script><img src=http://example.com/x.png>"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")  # fmt: skip
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def corpus() -> tuple[dict, list[tuple[str, str]]]:
    """Routes and (path, caption) rows: photos, duplicates, scene pairs, failures."""
    routes, rows = {}, []
    photos = {name: (cap, arr) for name, cap, arr in skimage_photos() if name in PHOTOS}
    for name, (cap, arr) in photos.items():
        im = Image.fromarray(arr)
        im.thumbnail((256, 256))
        routes[f"/photo/{name}.jpg"] = Route(_jpeg(im), "image/jpeg")
        rows.append((f"/photo/{name}.jpg", KEPT_SCRIPT if name == "astronaut" else cap))
        if name == "coffee":  # the same bytes elsewhere, and a re-encode
            routes["/mirror/coffee.jpg"] = routes[f"/photo/{name}.jpg"]
            rows.append(("/mirror/coffee.jpg", cap))
            routes["/reencode/coffee.jpg"] = Route(_jpeg(im, quality=60), "image/jpeg")
            rows.append(("/reencode/coffee.jpg", cap))
    rng = random.Random(3)
    for j in range(6):
        for k, s in enumerate(scenes.confounder_pair(rng)):
            routes[f"/scene/{j}-{k}.jpg"] = Route(_jpeg(s.image), "image/jpeg")
            rows.append((f"/scene/{j}-{k}.jpg", s.caption))
    routes["/missing.jpg"] = Route(b"no", "text/plain", status=404)
    rows.append(("/missing.jpg", REJECTED_SCRIPT))
    return routes, rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run folder."""
    tmp = tmp_path_factory.mktemp("report_run")
    routes, rows = corpus()
    with LocalHTTPServer(routes) as server:
        urls = [server.url(p) for p, _ in rows] + ["not a url"]
        caps = [c for _, c in rows] + ["a broken url"]
        pq.write_table(pa.table({"url": urls, "caption": caps}), tmp / "urls.parquet")
        stages = [
            {"name": "download", "image_size": 128, "timeout": 2.0, "retries": 0, "allow_networks": ["127.0.0.1/32"]},
            "dedup_exact",
            "dedup_phash",
            {"name": "clip_score", "model": "pf-tiny", "pretrained": str(SCORER_CHECKPOINT), "threshold": 0.6},
            {"name": "regions", "detectors": [{"model": "pf-tiny"}], "batch_size": 16, "micro_batch": 8},
            "confounders",
            "shard",
        ]
        job = {"input": {"paths": ["urls.parquet"]}, "output": {"dir": "out", "samples_per_shard": 10}}
        run_job(load_job({**job, "runner": "local", "stages": stages}, base_dir=tmp))
    return tmp / "out"


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    """The report written by the CLI to a folder of its own: (index.html, stdout)."""
    dest = tmp_path_factory.mktemp("report") / "page"
    r = subprocess.run([PAIRFORGE, "report", str(run), "--out", str(dest)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dest / "index.html", r.stdout


class Markup(HTMLParser):
    """Tags and attributes of a page (stdlib parser: it reads what a browser would tokenise)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Markup:
    m = Markup()
    m.feed(page)
    return m


def test_page_is_self_contained_and_escapes_captions(run, report):
    index, stdout = report
    assert f"wrote {index}" in stdout
    page = index.read_text()
    m = parse(page)
    assert not [t for t, _ in m.tags if t in ("script", "iframe", "object", "embed")]
    imgs = [a["src"] for t, a in m.tags if t == "img"]
    assert len(imgs) > 20
    for src in imgs:
        assert src.startswith("data:") or (index.parent / src).is_file(), src
    for t, a in m.tags:  # nothing the page loads or links lives off the machine
        for attr in ("src", "href"):
            assert not a.get(attr, "").lower().startswith(("http:", "https:", "//")), (t, a)
    text = "".join(m.text)
    assert KEPT_SCRIPT in text and REJECTED_SCRIPT in text  # shown as text, not markup
    assert "&lt;script&gt;alert(&quot;kept&quot;)&lt;/script&gt;" in page
    man = read_manifest(run)
    funnel = page[page.index('<table id="funnel">') : page.index("</table>", page.index('id="funnel"'))]
    for st in man["stages"]:
        assert f"<td>{st['name']}</td><td class=n>{st['in']}</td><td class=n>{st['out']}</td>" in funnel
    for st in man["stages"]:
        for reason in st["dropped"]:  # every reason links to its examples
            assert f"{reason}</a>" in funnel and f">{st['name']}: {reason} <" in page
    ids = {a["id"] for _, a in m.tags if "id" in a}
    assert [h for _, a in m.tags if (h := a.get("href", "")).startswith("#") and h[1:] not in ids] == []
    cards = page[page.index('id="pairs"') :].split("<h2")[0].count('class="card"')
    assert cards == man["counts"]["ok"]  # fewer than 48: all of them


def test_page_shows_histograms_duplicates_regions_and_confounders(run, report):
    index, _ = report
    page = index.read_text()
    for png in ("clip_score.png", "regions.png", "phash.png"):
        assert (index.parent / png).is_file() and f'src="{png}"' in page
        assert Image.open(index.parent / png).size[0] > 300
    assert "threshold 0.6" in page
    assert "every stored image is 128x128" in page  # one size for all: a line, not a figure
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((run / "rejects").glob("*.parquet"))]).to_pandas()
    mirror = rejects[rejects["url"].str.endswith("/mirror/coffee.jpg")].iloc[0]
    assert mirror["reason"] == "duplicate_pair" and mirror["duplicate_of"]  # same bytes, same caption
    section = page[page.index(">dedup_exact: duplicate_pair <") :]
    section = section[: section.index("</table>")]
    assert f'src="img/{mirror["duplicate_of"]}.jpg"' in section  # the survivor's thumbnail beside the duplicate
    drawn = sorted((index.parent / "img").glob("*.regions.png"))
    assert drawn, "no image with regions"
    ims = [np.asarray(Image.open(p).convert("RGB")) for p in drawn]
    assert all(max(im.shape[:2]) == 320 for im in ims)
    # the most frequent label's colour (its box and tag) on the images that show that label
    assert max((im == (230, 25, 75)).all(axis=-1).sum() for im in ims) > 100
    conf = pq.read_table(run / "confounders").to_pandas()
    for kind in set(conf["kind"]):
        assert f'id="c-{kind}"' in page
    word = conf[(conf["kind"] == "word_order") & conf["partner_key"].notna()]
    assert len(word), "no scene pair survived as a word_order pair"
    section = page[page.index('id="c-word_order"') :]
    assert any(f'src="img/{k}.jpg"' in section for k in word["partner_key"])  # a partner beside its anchor


def test_report_of_no_run_exits_2_naming_the_path(tmp_path):
    r = subprocess.run([PAIRFORGE, "report", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(tmp_path / "nothing") in r.stderr, r.stderr
    r = subprocess.run([PAIRFORGE, "report", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "manifest.json" in r.stderr, r.stderr


# -- in a browser -------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make setup installs it)")


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run([*cmd, page.resolve().as_uri()], capture_output=True, text=True, timeout=60)


def console_lines(stderr: str) -> list[str]:
    """What Chromium's stderr logging says the page did wrong."""
    bad = ("CONSOLE", "Uncaught", "Failed to load resource", "Content Security Policy")
    return [line for line in stderr.splitlines() if any(b in line for b in bad)]


async def _devtools(page: Path, profile: Path) -> dict:
    """Load ``page`` over the DevTools protocol; return its problems and its images' state."""
    import aiohttp

    log = open(profile.parent / f"{profile.name}.log", "w")
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not open DevTools"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            target = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                return await _load_and_ask(ws, page)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


async def _load_and_ask(ws, page: Path) -> dict:
    ids, events, replies = iter(range(1, 1000)), [], {}

    async def call(method, **params):
        i = next(ids)
        await ws.send_json({"id": i, "method": method, "params": params})
        while i not in replies:
            msg = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
            (replies.__setitem__(msg["id"], msg) if "id" in msg else events.append(msg))
        return replies[i].get("result", {})

    for domain in ("Runtime", "Log", "Network", "Page"):
        await call(f"{domain}.enable")
    await call("Page.navigate", url=page.resolve().as_uri())
    while not any(e["method"] == "Page.loadEventFired" for e in events):
        msg = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
        events.append(msg) if "method" in msg else None
    ask = (
        "JSON.stringify({images: Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
        "i.naturalWidth]), scripts: document.scripts.length, funnel: document.querySelectorAll('#funnel tr').length, "
        "text: document.body.innerText})"
    )
    state = json.loads((await call("Runtime.evaluate", expression=ask, returnByValue=True))["result"]["value"])
    problems = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            problems.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{p['type']}: {p.get('args')}")
        elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            problems.append(f"log {p['entry']['level']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            problems.append(f"load failed: {p.get('errorText')}")
        elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
            problems.append(f"request off the page's folder: {p['request']['url']}")
    return {"problems": problems, **state}


def devtools(page: Path, profile: Path) -> dict:
    return asyncio.run(_devtools(page, profile))


@needs_chromium
def test_chromium_renders_the_page_without_errors(run, report, tmp_path):
    index, _ = report
    html_imgs = [a["src"] for t, a in parse(index.read_text()).tags if t == "img"]
    shot = tmp_path / "report.png"
    r = chromium(index, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1400,3000")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert console_lines(r.stderr) == []
    im = np.asarray(Image.open(shot).convert("L"))
    assert im.shape == (3000, 1400) and im.std() > 20  # drawn, not a blank page
    dom = chromium(index, tmp_path / "p2", "--dump-dom")
    assert dom.returncode == 0 and console_lines(dom.stderr) == []
    m = parse(dom.stdout)
    assert ("table", {"id": "funnel"}) in m.tags
    assert [a["src"] for t, a in m.tags if t == "img"] == html_imgs
    assert not [t for t, _ in m.tags if t == "script"]
    assert KEPT_SCRIPT in "".join(m.text)
    got = devtools(index, tmp_path / "p3")
    assert got["problems"] == []
    assert got["scripts"] == 0 and got["funnel"] == len(read_manifest(run)["stages"]) + 1
    assert len(got["images"]) == len(html_imgs)
    assert [src for src, done, width in got["images"] if not done or width == 0] == []  # every image decoded
    assert KEPT_SCRIPT in got["text"] and REJECTED_SCRIPT in got["text"]
    print(f"screenshot: {shot}")


@needs_chromium
def test_the_browser_check_sees_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><img src="missing.jpg"><script>console.error("boom"); nope();</script>')
    got = devtools(page, tmp_path / "p")
    text = "\n".join(got["problems"])
    assert "boom" in text and "nope" in text and "missing.jpg" in text, text
    assert [src for src, _, width in got["images"] if width == 0] == ["missing.jpg"]
    assert console_lines(chromium(page, tmp_path / "q", "--dump-dom").stderr)


def test_a_bare_run_makes_a_page_without_the_sections_it_has_no_data_for(tmp_path):
    """Shards written by the writer alone: no clip_score, regions or confounders,
    one shard whose rows were all rejected, a manifest with little in it."""
    from pairforge.manifests.report import write_report
    from pairforge.manifests.shards import write_shard
    from tests.shardkit import rows

    write_shard(rows(4, 0, rejected={1: "too_small"}), tmp_path, 0)
    write_shard(rows(2, 1, rejected={0: "too_small", 1: "too_small"}), tmp_path, 1)
    stages = [{"name": "filter", "in": 6, "out": 3, "dropped": {"too_small": 3}}, {"name": "shard", "in": 3, "out": 3}]
    (tmp_path / "manifest.json").write_text(
        json.dumps({"counts": {"input": 6, "ok": 3, "rejected": 3}, "stages": stages})
    )
    done = write_report(tmp_path, grid=2)
    page = Path(done["path"]).read_text()
    assert done["pairs"] == 2 and page.count('class="card"') == 2  # grid=2 of 3 kept
    assert ">filter: too_small <" in page and "This run has no regions" in page and "no confounders" in page
    assert not (tmp_path / "report" / "clip_score.png").exists() and "every stored image is 32x32" in page
    for src in [a["src"] for t, a in parse(page).tags if t == "img"]:
        assert (tmp_path / "report" / src).is_file()
