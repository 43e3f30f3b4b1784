"""Labelled image sets for zero-shot evaluation, read the same way whatever
they were stored as.

Why one reader for three layouts: evaluation sets come as whatever their
authors shipped. torchvision's ``ImageFolder`` tree (``ROOT/<class>/*.jpg``)
is the common one for benchmarks; Hugging Face exports are parquet with an
image column (raw bytes, or a ``{"bytes": ..., "path": ...}`` struct) and a
label column; a pairforge run (or any webdataset) is tar shards with a label
in each sample's ``.cls`` member or in a field of its ``.json``. Each becomes
a :class:`LabelledSet`: the image bytes, a class index per image, the class
names in index order, and a caption per image where the set has one (for
retrieval recall).

Nothing here decodes an image (the evaluation does, in batches, and counts
the ones that fail); nothing here trusts a file name or a field as code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: label columns looked for, in order, when none is named
LABEL_COLUMNS = ("label", "cls", "class", "labels")
IMAGE_COLUMNS = ("image", "jpg", "png", "img", "image_bytes")


class LabelledSetError(ValueError):
    """A labelled set that cannot be read as asked (names the file and the column)."""


@dataclass
class LabelledSet:
    images: list[bytes]
    labels: list[int]
    classes: list[str]
    keys: list[str]
    #: one caption per image, or empty when the set has none
    captions: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


def read_class_names(path: str | Path) -> list[str]:
    """One class name a line (blank lines and ``#`` comments skipped), in label order."""
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise LabelledSetError(f"{path}: no class names (one a line)")
    return names


def read_labelled(
    location: str | Path,
    label_column: str | None = None,
    classes: list[str] | None = None,
    limit: int = 0,
    need_labels: bool = True,
) -> LabelledSet:
    """The labelled set at ``location``: an ImageFolder tree, a ``.parquet``
    file (or a folder of them), or webdataset shards (a run folder, a shard
    folder, ``.tar`` files, a brace pattern). ``classes`` names the labels
    (index order); without it, an ImageFolder's folder names or the sorted
    distinct string labels are used. ``limit``: at most that many images.
    ``need_labels=False`` (decontamination indexes only need the images):
    images without a label are read too, every label is 0 and no names are checked."""
    text = str(location)
    path = Path(text)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")) and not _has_tars(path)):
        out = _read_parquet(path, label_column, classes, limit, need_labels)
    elif path.is_dir() and not _has_tars(path) and any(p.is_dir() for p in path.iterdir()):
        out = _read_image_folder(path, classes, limit)
    else:
        out = _read_webdataset(text, label_column, classes, limit, need_labels)
    if not len(out):
        raise LabelledSetError(f"{location}: no labelled images")
    out.source = text
    return out


def _has_tars(path: Path) -> bool:
    return any(path.glob("*.tar")) or any((path / "shards").glob("*.tar"))


def _read_image_folder(root: Path, classes: list[str] | None, limit: int) -> LabelledSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = classes or [p.name.replace("_", " ") for p in folders]
    if len(names) != len(folders):
        raise LabelledSetError(f"{root}: {len(folders)} class folders but {len(names)} class names given")
    per_class = [
        [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        for folder in folders
    ]
    # round-robin over the classes, so that --limit keeps every class rather than the first few folders
    order = [
        (i, j) for j in range(max(map(len, per_class), default=0)) for i in range(len(folders)) if j < len(per_class[i])
    ]
    if limit:
        order = sorted(order[:limit])
    out = LabelledSet([], [], list(names), [])
    for idx, j in order:
        f = per_class[idx][j]
        out.images.append(f.read_bytes())
        out.labels.append(idx)
        out.keys.append(f"{folders[idx].name}/{f.name}")
    return out


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], where: str, what: str) -> str:
    if wanted:
        if wanted not in names:
            raise LabelledSetError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    found = next((c for c in defaults if c in names), None)
    if found is None:
        raise LabelledSetError(f"{where}: no {what} column among {', '.join(names)} (name one: --label-column)")
    return found


def _image_value(v) -> bytes | None:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, dict) and isinstance(v.get("bytes"), (bytes, bytearray)):  # Hugging Face's Image feature
        return bytes(v["bytes"])
    return None


def _read_parquet(
    path: Path, label_column: str | None, classes: list[str] | None, limit: int, need_labels: bool = True
) -> LabelledSet:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    images, raw, keys, captions = [], [], [], []
    for f in files:
        names = pq.read_schema(f).names
        img_col = _pick(names, None, IMAGE_COLUMNS, str(f), "image")
        lab_col = _pick(names, label_column, LABEL_COLUMNS, str(f), "label") if need_labels else None
        cap_col = "caption" if "caption" in names else None
        cols = [c for c in (img_col, lab_col, cap_col, "key" if "key" in names else None) if c]
        table = pq.read_table(f, columns=cols).to_pydict()
        for i, (img, lab) in enumerate(zip(table[img_col], table[lab_col] if lab_col else [0] * len(table[img_col]))):
            data = _image_value(img)
            if data is None or lab is None:
                continue  # a row with no image or no label says nothing about the model
            images.append(data)
            raw.append(lab)
            keys.append(str(table["key"][i]) if "key" in table else f"{f.stem}/{i}")
            if cap_col:
                captions.append(str(table[cap_col][i] or ""))
            if limit and len(images) >= limit:
                break
        if limit and len(images) >= limit:
            break
    labels, names = _index_labels(raw, classes, str(path)) if need_labels else ([0] * len(raw), ["?"])
    return LabelledSet(images, labels, names, keys, captions if cap_col else [])


def _read_webdataset(
    location: str, label_column: str | None, classes: list[str] | None, limit: int, need_labels: bool = True
) -> LabelledSet:
    from pairforge.trainer.data import IMAGE_EXTS, find_shards, shard_samples

    shards = find_shards([location])
    images, raw, keys, captions = [], [], [], []
    for s in shard_samples({"url": u} for u in shards):
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        lab = _sample_label(s, label_column) if need_labels else 0
        if ext is None or lab is None:
            continue
        images.append(s[ext])
        raw.append(lab)
        keys.append(s["__key__"])
        captions.append(s["txt"].decode("utf-8", "replace") if "txt" in s else "")
        if limit and len(images) >= limit:
            break
    if not images:
        what = f"field {label_column!r}" if label_column else "'.cls' member or 'label' field"
        raise LabelledSetError(f"{location}: no sample has an image and a {what}")
    labels, names = _index_labels(raw, classes, location) if need_labels else ([0] * len(raw), ["?"])
    return LabelledSet(images, labels, names, keys, captions if any(captions) else [])


def _sample_label(sample: dict, label_column: str | None):
    if not label_column and "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else text
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        for name in (label_column,) if label_column else LABEL_COLUMNS:
            if isinstance(meta, dict) and meta.get(name) not in (None, ""):
                return meta[name]
    return None


def _index_labels(raw: list, classes: list[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Class indices and names: integer labels index ``classes``; string
    labels are looked up in ``classes`` (or, without it, in their own sorted set)."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        if classes is None:
            raise LabelledSetError(f"{where}: integer labels need class names (--classes FILE, one a line)")
        bad = sorted({v for v in raw if not 0 <= v < len(classes)})
        if bad:
            raise LabelledSetError(f"{where}: label {bad[0]} is outside the {len(classes)} class names given")
        return list(raw), list(classes)
    text = [str(v) for v in raw]
    names = list(classes) if classes else sorted(set(text))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise LabelledSetError(f"{where}: label {unknown[0]!r} is not among the class names given")
    return [index[t] for t in text], names
