"""``pairforge report OUT``: one self-contained HTML page about a finished run.

Why: ``manifest show`` prints counts, but whether a run is *good* shows in
its pairs: what the kept images and captions look like, where the clip
score cut fell, which duplicates went with which survivor, whether the
boxes sit on the objects, what a confounder pairs an anchor with. The page
reads only the run's contract files (``manifest.json``, ``shards/``,
``rejects/``, ``confounders/``; see ``manifests/FORMAT.md``) and writes,
under ``OUT/report`` (or ``--out DIR``):

* ``index.html``: the funnel (rows per stage, dropped by reason), a grid of
  kept pairs, the histograms, reject examples per reason, regions and
  confounders; no script, no external address (a Content-Security-Policy
  says so to the browser), every caption and URL HTML-escaped;
* ``*.png`` beside it: the histograms (``manifests/report_plots.py``);
* ``img/<key>.jpg`` thumbnails read from ``shards/*.tar``, and
  ``img/<key>.regions.png`` with the boxes drawn.

Samples are picked by the SHA-1 of their key, so the same run gives the
same page whatever its shard layout. Rejected rows have no image (a run
keeps none); a duplicate is shown beside its survivor (the rejects'
``duplicate_of``) when the survivor is in the shards. Every file is
written atomically, ``index.html`` last.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pairforge.manifests import layout, report_html, report_images, report_plots, report_signals
from pairforge.manifests.regions import ragged_rows
from pairforge.stages.common import balancing

GRID = 48
PER_REASON = 4
REGION_EXAMPLES = 8
PER_KIND = 4
PHASH_SAMPLE = 3000  # kept hashes searched for their nearest neighbour
SAMPLE_COLUMNS = ("key", "caption", "url", "clip_score", "width", "height", "original_width", "original_height",
                  "num_regions", "phash", "image_ext")  # fmt: skip
REJECT_COLUMNS = ("key", "status", "stage", "reason", "detail", "error_message", "url", "caption", "duplicate_of",
                  "clip_score")  # fmt: skip


class ReportError(ValueError):
    """A run's files cannot make a report (names the file)."""


def rank(key) -> str:
    """Sort key of the deterministic samples: the SHA-1 of the row's key."""
    return hashlib.sha1(str(key).encode()).hexdigest()


def load_manifest(out) -> dict:
    path = layout.manifest_json(out)
    if not path.is_file():
        raise FileNotFoundError(f"no run at {out}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ReportError(f"{path} is not JSON: {e}") from e


def stage_config(man: dict, name: str) -> dict | None:
    """The job's settings of stage ``name``, as the manifest recorded them."""
    for st in (man.get("job") or {}).get("stages") or []:
        if st == name:
            return {"name": name}
        if isinstance(st, dict) and st.get("name") == name:
            return st
    return None


def read_table(paths, columns, shard_of: bool = False) -> pd.DataFrame:
    """The listed parquet files' ``columns`` (those they have; ``None``: all) as one frame;
    with ``shard_of``, a ``_shard`` column from each file's name."""
    frames = []
    for p in paths:
        have = pq.read_schema(p).names
        df = pq.read_table(p, columns=None if columns is None else [c for c in columns if c in have]).to_pandas()
        if shard_of:
            df["_shard"] = int(Path(p).stem)
        frames.append(df)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key"])


def _numbered(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if p.stem.isdigit())


#: the most characters of one value (a caption, a URL, an error) the page shows
TEXT_CHARS = 1000


def _text(v) -> str:
    """A value as the page shows it: cut at :data:`TEXT_CHARS` (a caption of
    megabytes is data, not something to put in a page), saying so."""
    s = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
    return s if len(s) <= TEXT_CHARS else f"{s[:TEXT_CHARS]}… ({len(s):,} characters)"


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _detail(s) -> dict:
    try:
        d = json.loads(s) if s else {}
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def read_evals(out) -> list[dict]:
    """The figures ``pairforge eval --run OUT`` filed under ``OUT/eval/``
    (data only: a file that is not a JSON object is listed with a note)."""
    folder = layout.eval_dir(out)
    found = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            data = {"summary": f"unreadable: {type(e).__name__}"}
        found.append({"name": f.stem, **(data if isinstance(data, dict) else {"summary": "not a JSON object"})})
    return found


class Report:
    """What the page shows, gathered from one run folder (see the module doc)."""

    def __init__(self, out, dest=None, grid: int = GRID):
        self.out = Path(out)
        if not self.out.is_dir():
            raise FileNotFoundError(f"no run at {out}: not a folder")
        self.man = load_manifest(out)
        self.dest = Path(dest) if dest else self.out / "report"
        if grid < 0:
            raise ReportError(f"--pairs: expected a count >= 0, got {grid}")
        self.grid_size = grid
        signals = tuple(report_signals.columns(self.man))
        self.samples = read_table(_numbered(layout.shards_dir(out)), SAMPLE_COLUMNS + signals, shard_of=True)
        self.rejects = read_table(_numbered(self.out / "rejects"), REJECT_COLUMNS + signals)
        self.confounders = read_table(_numbered(layout.side_table_dir(out, "confounders")), None)
        self.samples["_rank"] = [rank(k) for k in self.samples["key"]]
        self.samples = self.samples.sort_values("_rank", kind="stable").reset_index(drop=True)
        self.by_key = {str(k): i for i, k in enumerate(self.samples["key"])}
        self.rejected = {str(k): i for i, k in enumerate(self.rejects["key"])} if len(self.rejects) else {}
        self.evals = read_evals(out)
        self.images: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}  # path under dest -> bytes

    # -- samples and their thumbnails ------------------------------------------------

    def sample(self, key) -> dict:
        """A kept sample as the page shows it (``img`` filled in by :meth:`thumbs`)."""
        i = self.by_key.get(str(key))
        if i is None:
            return {"key": str(key), "img": None, "caption": "", "missing": True}
        r = self.samples.iloc[i]
        return {
            "key": str(key),
            "img": f"img/{report_images.safe_name(key)}.jpg",
            "caption": _text(r.get("caption")),
            "url": _text(r.get("url")),
            "clip_score": _float(r.get("clip_score")),
            "size": (int(r["width"]), int(r["height"])) if "width" in r and "height" in r else None,
            "missing": False,
        }

    def thumbs(self, items: list[dict]) -> None:
        """Write a thumbnail for every shown sample; ``img`` is ``None`` where
        the tar had no readable image."""
        need = {d["key"]: int(self.samples.at[self.by_key[d["key"]], "_shard"]) for d in items if not d["missing"]}
        need = {k: s for k, s in need.items() if k not in self.images}
        try:
            self.images.update(report_images.read_images(self.out, need))
        except ValueError as e:  # a tar that is not one
            raise ReportError(str(e)) from e
        for d in items:
            if d["missing"] or d["img"] in self.files:
                continue
            jpg = report_images.thumbnail(self.images.get(d["key"]))
            if jpg is None:
                d["img"] = None
            else:
                self.files[d["img"]] = jpg

    def grid(self) -> list[dict]:
        return [self.sample(k) for k in self.samples["key"].iloc[: self.grid_size]]

    # -- rejects ---------------------------------------------------------------------

    def survivor(self, row) -> dict | None:
        """The kept row a duplicate was dropped for, where the run names one."""
        det = _detail(row.get("detail"))
        key = _text(row.get("duplicate_of")) or _text(det.get("duplicate_of") or det.get("survivor"))
        if not key:
            return None
        if det.get("build"):
            return {"key": key, "img": None, "caption": "", "missing": True, "where": f"in prior build {det['build']}"}
        s = self.sample(key)
        if s["missing"] and key in self.rejected:
            later = self.rejects.iloc[self.rejected[key]]
            s["where"] = f"dropped too, by {_text(later.get('stage'))} ({_text(later.get('reason'))})"
        elif s["missing"]:
            s["where"] = "not in this run's shards"
        return s

    def reject_groups(self) -> list[dict]:
        """Per (stage, reason), in funnel order: the count and a few rows."""
        if not len(self.rejects) or "reason" not in self.rejects.columns:
            return []
        order = {st.get("name"): i for i, st in enumerate(self.man.get("stages") or [])}
        rej = self.rejects.assign(_rank=[rank(k) for k in self.rejects["key"]])
        rej["stage"] = rej["stage"].fillna("") if "stage" in rej.columns else ""
        groups = []
        for (stage, reason), g in rej.groupby(["stage", "reason"], sort=False):
            if "duplicate_of" in g.columns:  # examples whose survivor has a thumbnail first
                g = g.assign(_has=[0 if _text(k) in self.by_key else 1 for k in g["duplicate_of"]])
                g = g.sort_values(["_has", "_rank"], kind="stable")
            else:
                g = g.sort_values("_rank", kind="stable")
            rows = []
            for _, r in g.head(PER_REASON).iterrows():
                rows.append({c: _text(r.get(c)) for c in ("key", "url", "caption", "reason", "error_message")})
                rows[-1]["survivor"] = self.survivor(r)
            groups.append({"stage": stage, "reason": reason, "count": len(g), "rows": rows})
        groups.sort(key=lambda d: (order.get(d["stage"], len(order)), -d["count"], d["reason"]))
        return groups

    # -- regions and confounders -----------------------------------------------------

    def region_examples(self) -> tuple[list[dict], Counter]:
        """A few kept images with boxes drawn, and every box's label counted."""
        if "num_regions" not in self.samples.columns:
            return [], Counter()
        shards = sorted(set(self.samples["_shard"]))
        labels, picked = Counter(), []
        want = set(self.samples.loc[self.samples["num_regions"] > 0, "key"].iloc[:REGION_EXAMPLES].map(str))
        for sid in shards:
            path = layout.shard_parquet(self.out, sid)
            t = pq.read_table(path, columns=[c for c in ("key", "region_boxes", "region_labels", "region_scores")
                                              if c in pq.read_schema(path).names])  # fmt: skip
            if "region_labels" not in t.column_names:
                continue
            labs = ragged_rows(t.column("region_labels"))
            labels.update(str(x) for row in labs for x in row)
            if "region_boxes" not in t.column_names:
                continue
            boxes = ragged_rows(t.column("region_boxes"), np.float64)
            scores = ragged_rows(t.column("region_scores"), np.float32) if "region_scores" in t.column_names else None
            for i, key in enumerate(t.column("key").to_pylist()):
                if key in want:
                    sc = scores[i] if scores is not None else np.full(len(boxes[i]), np.nan)
                    picked.append((key, boxes[i], labs[i], sc))
        colours = report_images.colours_for(labels)
        picked.sort(key=lambda t: rank(t[0]))
        items = [self.sample(k) for k, *_ in picked]
        self.thumbs(items)
        for d, (key, b, lab, sc) in zip(items, picked):
            d["boxes"] = [(str(x), float(s)) for x, s in zip(lab, sc)]
            png = report_images.regions_png(self.images.get(key), b, lab, sc, colours)
            d["regions_img"] = f"img/{report_images.safe_name(key)}.regions.png" if png else None
            if png:
                self.files[d["regions_img"]] = png
        return items, labels

    def confounder_groups(self) -> list[dict]:
        c = self.confounders
        if not len(c) or "kind" not in c.columns or "anchor_key" not in c.columns:
            return []
        c = c.assign(_rank=[rank(f"{a}/{k}") for a, k in zip(c["anchor_key"], c["kind"])])
        c["_solo"] = c["partner_key"].isna() if "partner_key" in c.columns else True
        groups = []
        for kind, g in c.groupby("kind", sort=True):
            rows = []
            for _, r in g.sort_values(["_solo", "_rank"], kind="stable").head(PER_KIND).iterrows():
                partner = _text(r.get("partner_key"))
                rows.append(
                    {
                        "anchor": self.sample(r["anchor_key"]),
                        "partner": self.sample(partner) if partner else None,
                        "caption": _text(r.get("caption")),
                        "similarity": _float(r.get("similarity")),
                        "rule": _text(r.get("rule")),
                    }
                )
            self.thumbs([x for row in rows for x in (row["anchor"], row["partner"]) if x])
            groups.append({"kind": str(kind), "count": len(g), "rows": rows})
        return groups

    # -- histograms ------------------------------------------------------------------

    def plots(self, region_labels: Counter) -> list[dict]:
        """Draw the histograms the run has data for (PNG files beside the page)."""
        s, r = self.samples, self.rejects
        figs = []
        clip = stage_config(self.man, "clip_score")
        if clip or "clip_score" in s.columns:
            kept = s["clip_score"] if "clip_score" in s.columns else []
            dropped = r.loc[r["stage"] == "clip_score", "clip_score"] if {"stage", "clip_score"} <= set(r) else []
            cut, label = _float((clip or {}).get("threshold")), "threshold"
            if cut is None and (clip or {}).get("top_fraction") is not None and len(kept):
                cut, label = _float(np.nanmin(kept)), "lowest kept (top_fraction)"
            png = report_plots.clip_score(kept, dropped, cut, label)
            figs.append(("clip_score", "CLIP score", png, f"{label} {cut:.3g}" if cut is not None else "no cut"))
        if {"width", "height"} <= set(s.columns):
            panels = {"stored image": (s["width"], s["height"])}
            if {"original_width", "original_height"} <= set(s.columns):
                panels["downloaded image"] = (s["original_width"], s["original_height"])
            png, notes = report_plots.image_sizes(panels)
            figs.append(("sizes", "Image sizes", png, "; ".join(notes)))
        if "num_regions" in s.columns:
            figs.append(("regions", "Regions", report_plots.regions(s["num_regions"], region_labels), ""))
        dups = []
        if {"reason", "detail"} <= set(r):  # dedup_phash writes each duplicate's distance to its survivor
            dups = [_detail(d).get("distance") for d in r.loc[r["reason"] == "duplicate_phash", "detail"]]
        nearest = report_plots.nearest_hamming(list(s["phash"].iloc[:PHASH_SAMPLE])) if "phash" in s.columns else []
        max_d = (stage_config(self.man, "dedup_phash") or {}).get("max_distance")
        png = report_plots.phash_distances([d for d in dups if d is not None], nearest, max_d)
        figs.append(("phash", "pHash distances", png, f"nearest other among {len(nearest)} kept images (by key hash)"))
        figs += report_signals.plots(self.man, s, r)
        bal = balancing.summary(next((f for f in self.man.get("fits") or [] if f.get("stage") == "balance"), None))
        if bal is not None:  # the balance fit's counters (stages/common/balancing.py)
            png = report_plots.entry_counts(
                balancing.rank_curve(bal["hist_before"]), balancing.rank_curve(bal["hist_after"]), bal["t"]
            )
            note = f"{bal['entries_used']:,} entries used, {bal['entries_over_t']:,} over t; {bal['kept']:,} of {bal['rows']:,} rows kept"
            figs.append(("entries", "Metadata entry counts (balance)", png, note))
        out = []
        for name, title, png, note in figs:
            if png is not None:
                self.files[f"{name}.png"] = png
            if png is not None or (note and name == "sizes"):  # one size for all: the note says it
                out.append({"title": title, "src": f"{name}.png" if png is not None else None, "note": note})
        return out

    # -- the page --------------------------------------------------------------------

    def write(self) -> dict:
        grid = self.grid()
        self.thumbs(grid)
        rejects = self.reject_groups()
        self.thumbs([row["survivor"] for g in rejects for row in g["rows"] if row["survivor"]])
        regions, labels = self.region_examples()
        confounders = self.confounder_groups()
        plots = self.plots(labels)
        page = report_html.render(
            {
                "run": str(self.out.resolve()),
                "manifest": self.man,
                "grid": grid,
                "plots": plots,
                "rejects": rejects,
                "regions": regions,
                "confounders": confounders,
                "evals": self.evals,
            }
        )
        for rel, data in sorted(self.files.items()):
            layout.atomic_write_bytes(self.dest / rel, data)
        index = self.dest / "index.html"
        layout.atomic_write_bytes(index, page.encode("utf-8"))
        return {
            "path": str(index),
            "pairs": len(grid),
            "files": len(self.files),
            "plots": len(plots),
            "reject_reasons": len(rejects),
            "regions": len(regions),
            "confounders": sum(len(g["rows"]) for g in confounders),
            "evals": len(self.evals),
        }


def write_report(out, dest=None, grid: int = GRID) -> dict:
    """Write the report of run ``out`` to ``dest`` (default ``OUT/report``);
    returns its ``index.html`` path and what went in."""
    return Report(out, dest, grid).write()
