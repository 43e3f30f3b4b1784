"""``pairforge export coco OUT``: a run's regions and captions as COCO JSON.

Why: detection and captioning tools (pycocotools, COCOeval, detectron2's
and mmdet's loaders, FiftyOne) read COCO's format, not our shards. Two
files, from every ``shards/*.parquet`` of the run:

* ``OUT/coco.json``: ``images`` (``id`` = the sample's key as an integer,
  ``file_name`` = its tar member ``{key}.{image_ext}``, ``shard`` = the tar
  it is in, ``width``/``height`` of the stored image, ``key``),
  ``annotations`` (one per box: ``bbox`` in COCO's ``[x, y, w, h]`` pixels,
  the regions stage's normalised xyxy box times the image's size, ``area``,
  ``iscrowd`` 0, the detector's ``score``), ``categories`` and, beside them,
  ``captions`` (``{id, image_id, caption}``);
* ``OUT/coco_captions.json``: COCO's captions layout (``images`` and
  ``annotations`` holding ``caption``), which pycocotools' caption tools
  and coco-caption read.

Categories: the regions entry of ``manifest.json["stages"]`` when it lists
``categories`` (ids by position from 1, a leading ``__background__`` not
counted and ``N/A`` slots left out, so torchvision's COCO names keep COCO's
ids), then any other label found, sorted; else the distinct labels, sorted,
ids from 1. Both files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pairforge.manifests import layout
from pairforge.manifests.regions import RegionsError, regions_of, shard_ids

PLACEHOLDERS = ("N/A",)


def default_paths(out) -> tuple[Path, Path]:
    return Path(out) / "coco.json", Path(out) / "coco_captions.json"


def manifest_categories(out) -> list[str] | None:
    """``categories`` of the regions stage's manifest entry, if it has them."""
    path = layout.manifest_json(out)
    if not path.exists():
        return None
    stages = json.loads(path.read_text()).get("stages") or []
    if isinstance(stages, dict):
        entry = stages.get("regions")
    else:
        entry = next((s for s in stages if isinstance(s, dict) and s.get("name") == "regions"), None)
    cats = (entry or {}).get("categories")
    return [str(c) for c in cats] if cats else None


def category_ids(labels: set[str], listed: list[str] | None) -> dict[str, int]:
    """Label -> COCO category id (see the module doc)."""
    ids: dict[str, int] = {}
    if listed:
        names = listed[1:] if listed[0] == "__background__" else listed
        for i, name in enumerate(names, start=1):
            if name not in PLACEHOLDERS:
                ids.setdefault(name, i)
    nxt = max(ids.values(), default=0) + 1
    for name in sorted(labels - set(ids)):
        ids[name] = nxt
        nxt += 1
    return ids


def build_coco(out) -> tuple[dict, dict]:
    """The detection file's and the captions file's contents for run ``out``."""
    images, boxes_by_image, captions = [], [], []
    found_regions = False
    for sid in shard_ids(out):
        path = layout.shard_parquet(out, sid)
        table = pq.read_table(path)
        if table.num_rows == 0:  # an empty shard is written with its key column only
            continue
        boxes, labels, scores = regions_of(table, path)
        found_regions = True
        cols = table.column_names
        keys = table.column("key").to_pylist()
        exts = table.column("image_ext").to_pylist() if "image_ext" in cols else ["jpg"] * len(keys)
        texts = table.column("caption").to_pylist() if "caption" in cols else [None] * len(keys)
        widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
        tar = str(layout.shard_tar(out, sid).relative_to(out))
        for i, key in enumerate(keys):
            if not str(key).isdigit():
                raise RegionsError(f"{path}: key {key!r} is not a number; COCO image ids are integers")
            image_id = int(key)
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{key}.{exts[i] or 'jpg'}",
                    "shard": tar,
                    "key": key,
                    "width": int(widths[i]),
                    "height": int(heights[i]),
                }
            )
            boxes_by_image.append((image_id, boxes[i], labels[i], scores[i]))
            if texts[i] is not None:
                captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": str(texts[i])})
    if not found_regions:
        raise RegionsError(f"no samples with regions in {layout.shards_dir(out)}: every shard is empty")
    distinct = {str(lab) for _, _, labs, _ in boxes_by_image for lab in labs}
    cat_ids = category_ids(distinct, manifest_categories(out))
    annotations = []
    for image_id, bxs, labs, scs in boxes_by_image:
        for (x0, y0, x1, y1), lab, s in zip(bxs.tolist(), labs, scs.tolist()):
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[str(lab)],
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "score": s,
                }
            )
    categories = [{"id": i, "name": n, "supercategory": ""} for n, i in sorted(cat_ids.items(), key=lambda t: t[1])]
    info = {"description": f"pairforge export of {Path(out).name}", "version": "1.0"}
    detection = {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "captions": captions,
    }
    caption_file = {"info": info, "images": images, "annotations": captions}
    return detection, caption_file


def export_coco(out, path=None, captions_path=None) -> dict:
    """Write both files (defaults: ``OUT/coco.json``, ``OUT/coco_captions.json``)
    and return what went in them."""
    if not Path(out).is_dir():
        raise FileNotFoundError(f"no run folder at {out}")
    default, default_caps = default_paths(out)
    path, captions_path = Path(path or default), Path(captions_path or default_caps)
    detection, caption_file = build_coco(out)
    for p, doc in ((path, detection), (captions_path, caption_file)):
        layout.atomic_write_bytes(p, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
    return {
        "images": len(detection["images"]),
        "annotations": len(detection["annotations"]),
        "categories": len(detection["categories"]),
        "captions": len(caption_file["annotations"]),
        "path": str(path),
        "captions_path": str(captions_path),
    }
