"""``pairforge demo``: the main job on the embedded default, with no network.

An application of the package (it makes its corpus with the trainer's scene
and composite makers and runs a job), so it sits at the top with the command
line, above ``pipeline`` and ``trainer``.

It builds a small corpus of real image-caption pairs (skimage's photos and
Debian's Fashion-MNIST product photos), plants what the stages must find
(exact and near-duplicate images, captions that do not match their image,
Winoground-style pairs of generated scenes for the confounders stage, and
URLs that fail in every way a web crawl fails), serves it from a local HTTP
server, writes the URL list, and runs every stage that exists on local Ray.
"""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist, skimage_photos
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.trainer import scenes

FASHION_TEMPLATES = (
    "a photo of a {c}",
    "product photo of a {c} on a plain background",
    "{c} for sale, studio shot",
    "a black and white picture of a {c}",
    "catalogue image: {c}",
    "buy this {c} online",
)
N_FASHION = 240
#: composites with exact boxes (held-out ones of the pf-tiny detector's data) for the regions stage
N_COMPOSITES = 24
#: generated two-shape scenes, in pairs whose captions are the same words in another order
N_SCENE_PAIRS = 30
SCORER_CHECKPOINT = Path(__file__).resolve().parent / "pipeline" / "assets" / "pf-tiny-scorer.pt"


def _jpeg(img: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_corpus(seed: int = 0) -> tuple[dict[str, Route], list[dict]]:
    """Routes to serve and URL-list rows (with a ``planted`` column saying
    what each row is, carried through to the output metadata)."""
    rng = random.Random(seed)
    routes: dict[str, Route] = {}
    rows: list[dict] = []

    def add(path: str, route: Route, caption: str, planted: str) -> None:
        routes[path] = route
        rows.append({"path": path, "caption": caption, "planted": planted})

    originals: list[tuple[str, Image.Image, str]] = []
    for name, caption, arr in skimage_photos():
        im = Image.fromarray(arr)
        im.thumbnail((384, 384))
        add(f"/photo/{name}.jpg", Route(_jpeg(im), "image/jpeg"), caption, "original")
        originals.append((f"/photo/{name}.jpg", im, caption))
    images, labels = fashion_mnist("t10k", N_FASHION)
    for i, (img, lab) in enumerate(zip(images, labels)):
        im = Image.fromarray(255 - img).resize((112, 112), Image.BICUBIC)  # dark product on white, like a catalogue
        caption = rng.choice(FASHION_TEMPLATES).format(c=FASHION_CLASSES[lab])
        add(f"/fashion/{i:04d}.jpg", Route(_jpeg(im), "image/jpeg"), caption, "original")
        originals.append((f"/fashion/{i:04d}.jpg", im, caption))

    picks = rng.sample(originals, 40)
    for j, (path, _im, caption) in enumerate(picks[:10]):  # the same bytes at another URL
        add(f"/mirror/{j}.jpg", routes[path], caption, f"exact_copy_of:{path}")
    for j, (path, im, caption) in enumerate(picks[10:20]):  # re-encoded at another quality
        add(f"/reencode/{j}.jpg", Route(_jpeg(im, quality=60), "image/jpeg"), caption, f"reencode_of:{path}")
    for j, (path, im, caption) in enumerate(picks[20:28]):  # resized
        small = im.resize((max(8, im.width * 3 // 4), max(8, im.height * 3 // 4)), Image.BICUBIC)
        add(f"/resized/{j}.jpg", Route(_jpeg(small), "image/jpeg"), caption, f"resize_of:{path}")
    fashion_rows = [r for r in rows if r["path"].startswith("/fashion/") and r["planted"] == "original"]
    for r in rng.sample(fashion_rows, 20):  # a caption that names another class
        own = next(c for c in FASHION_CLASSES if c in r["caption"])
        other = rng.choice([c for c in FASHION_CLASSES if c != own and own not in c and c not in own])
        r["caption"] = r["caption"].replace(own, other)
        r["planted"] = f"mismatched_caption:{own}"

    scene_rng = random.Random(seed + 1)  # its own stream: the photos' planting above stays as it was
    for j in range(N_SCENE_PAIRS):  # Winoground-style pairs: the same words in another order, another image
        for k, s in enumerate(scenes.confounder_pair(scene_rng)):
            add(f"/scene/{j}-{k}.jpg", Route(_jpeg(s.image), "image/jpeg"), s.caption, f"scene_pair:{j}")

    for j, (im, caption) in enumerate(_composites(N_COMPOSITES)):  # objects at known places, for regions
        add(f"/composite/{j}.jpg", Route(_jpeg(im), "image/jpeg"), caption, "composite")

    ok_jpeg = routes[originals[0][0]].body
    failures = {
        "/missing/1.jpg": Route(b"no", "text/plain", status=404),
        "/missing/2.jpg": Route(b"no", "text/plain", status=404),
        "/error/500.jpg": Route(b"oops", "text/plain", status=500),
        "/slow/1.jpg": Route(ok_jpeg, "image/jpeg", delay=3.0),
        "/slow/2.jpg": Route(ok_jpeg, "image/jpeg", delay=3.0),
        "/page/1.jpg": Route(b"<html><body>not an image</body></html>", "text/html"),
        "/page/2.jpg": Route(b"\x00" * 512, "image/jpeg"),
        "/truncated/1.jpg": Route(ok_jpeg, "image/jpeg", truncate_after=len(ok_jpeg) // 3),
        "/truncated/2.jpg": Route(ok_jpeg[: len(ok_jpeg) // 2], "image/jpeg"),
        "/noai/1.jpg": Route(ok_jpeg, "image/jpeg", headers={"X-Robots-Tag": "noai"}),
        "/noai/2.jpg": Route(ok_jpeg, "image/jpeg", headers={"X-Robots-Tag": "otherbot: noindex, noimageai"}),
    }
    for path, route in failures.items():
        add(path, route, "a picture that will not arrive", f"failure:{path.split('/')[1]}")
    for j, (path, _, caption) in enumerate(picks[28:30]):
        add(f"/redirect/{j}.jpg", Route(redirect=path), caption, f"redirect_to:{path}")
    return routes, rows


def _composites(n: int) -> list[tuple[np.ndarray, str]]:
    """Held-out composites (``trainer.detection_data``) captioned by what is in them."""
    from pairforge.trainer.detection_data import CATEGORIES, Ingredients, make_composite

    ingr = Ingredients.from_sources(train_items=1, t10k_items=2000)
    out = []
    for j in range(n):
        c = make_composite(ingr, "heldout", j, seed=7)
        names = [CATEGORIES[int(k)] for k in c["labels"]]
        things = [f"a {x}" for x in names]
        text = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        out.append((c["image"], f"{text} on a photo"))
    return out


def write_url_list(server: LocalHTTPServer, rows: list[dict], path: Path) -> int:
    urls = [server.url(r["path"]) for r in rows]
    captions = [r["caption"] for r in rows]
    planted = [r["planted"] for r in rows]
    # URLs no download may follow: another loopback address, and no URL at all
    urls += [f"http://127.0.0.2:{server.port}/photo/astronaut.jpg", "not a url", ""]
    captions += ["a blocked address", "a broken url", "an empty url"]
    planted += ["failure:blocked_address", "failure:invalid_url", "failure:empty_url"]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": captions, "planted": planted}), path)
    return len(urls)


def demo_stages(scorer: Path | None) -> list:
    """Every stage, configured for the demo's small images (the model stages
    only when the scorer checkpoint is there)."""
    from pairforge.stages import (
        BasicFilter,
        ClipScore,
        Confounders,
        DedupExact,
        DedupPhash,
        DedupSemantic,
        Download,
        Regions,
        Shard,
    )

    stages = [
        Download(image_size=128, timeout=1.0, retries=0, allow_networks=["127.0.0.1/32"]),
        BasicFilter(min_image_size=64, min_caption_words=2),
        DedupExact(),
        DedupPhash(),
    ]
    if scorer is not None and scorer.exists():
        pretrained = "pf-tiny-scorer" if scorer == SCORER_CHECKPOINT else str(scorer)  # the shipped one by its short name
        stages += [
            ClipScore(model="pf-tiny", pretrained=pretrained, threshold=0.6),
            # eps is per model: the small scorer puts same-class product photos at cosine 0.95-0.99,
            # its re-encodes above 0.998 (SemDeDup's eps values were chosen for real CLIP on LAION)
            DedupSemantic(eps=0.002),
            # the project's own detector and MTCNN's faces (weights in its wheel)
            Regions(detectors=[{"model": "pf-tiny"}, {"model": "mtcnn"}], batch_size=64, micro_batch=8),
            Confounders(),  # after every filter: a partner must be a sample of the shards
        ]
    return [*stages, Shard()]


def demo_job(url_list: Path, out: Path, runner: str = "ray"):
    """The demo's job, built from objects (``pairforge.Job``): what
    ``docs/getting-started.md`` shows as YAML."""
    from pairforge.pipeline.config import InputConfig, JobConfig, OutputConfig, RayConfig

    return JobConfig(
        input=InputConfig(paths=[str(url_list)], source="pairforge-demo"),
        output=OutputConfig(dir=str(out), samples_per_shard=100),
        ray=RayConfig(num_cpus=os.cpu_count()),
        runner=runner,
        stages=demo_stages(SCORER_CHECKPOINT),
    )


def run_demo(
    out_dir: str = "demo_out",
    runner: str = "ray",
    resume: bool = False,
    verbose: bool = False,
    progress_every: float | None = None,
) -> dict:
    from pairforge.manifests.summary import summary_lines
    from pairforge.pipeline.job import run_job

    out = Path(out_dir).resolve()
    routes, rows = build_corpus()
    with LocalHTTPServer(routes) as server:
        url_list = out / "input" / "urls.parquet"
        n = write_url_list(server, rows, url_list)
        print(f"[demo] serving {len(routes)} paths on {server.url('/')}; {n} URLs in {url_list}", file=sys.stderr)
        job = demo_job(url_list, out / "run", runner)
        manifest = run_job(job, resume=resume, verbose=verbose, progress_every=progress_every)
    print("\n".join(summary_lines(manifest, str(out / "run"))))
    print(
        f"\nshards:   {out / 'run' / 'shards'}\nrejects:  {out / 'run' / 'rejects'}\nmanifest: {out / 'run' / 'manifest.json'}"
    )
    from pairforge.manifests.report import write_report

    print(f"report:   {write_report(out / 'run')['path']}")
    return manifest
