"""The cheap caption and image filters of DataComp's "basic filtering"
baseline (Gadre et al. 2023, and ``baselines/utils.py`` of
mlfoundations/datacomp), each rule its own reject reason:

* ``caption_too_short``: fewer than ``min_caption_words`` whitespace words
  or fewer than ``min_caption_chars`` characters (DataComp: more than 2
  words and more than 5 characters, so 3 and 6);
  ``caption_too_long``: more than ``max_caption_words`` (off by default)
* ``image_too_small``: shorter side below ``min_image_size`` (DataComp: 200)
* ``aspect_ratio_too_large``: longer / shorter side above
  ``max_aspect_ratio`` (DataComp: 3.0)
* ``caption_language``: the row's ``language_column`` is not one of
  ``languages`` (off by default). DataComp detects English with fastText's
  lid.176 model, which cannot be fetched here; this filter only reads a
  language column the URL list already has (LAION's ``LANGUAGE``, or one a
  detector wrote).

Sizes are the original image's (``original_width`` / ``original_height``, as
DataComp measured them, before the download stage resized) unless
``use_original_size`` is off or the row has none. The first failing rule, in
the order above, names the row; the detail holds the values behind it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, Resources, Stage, batch_len, reject, require
from pairforge.stages.options import options


@options
class Config:
    #: drop captions of fewer whitespace words (``caption_too_short``; DataComp: 3)
    min_caption_words: int = 3
    #: drop captions of fewer characters (``caption_too_short``; DataComp: 6)
    min_caption_chars: int = 6
    #: drop captions of more words (``caption_too_long``); null: no limit
    max_caption_words: int | None = None
    #: drop images whose shorter side is below this (``image_too_small``; DataComp: 200)
    min_image_size: int = 200
    #: drop images whose longer / shorter side is above this (``aspect_ratio_too_large``); null: no limit
    max_aspect_ratio: float | None = 3.0
    #: judge sizes on the original image (``original_width`` / ``original_height``),
    #: as DataComp did, rather than the stored one
    use_original_size: bool = True
    #: keep only rows whose ``language_column`` is one of these; empty: no check
    languages: tuple[str, ...] = ()
    #: the URL list column holding each caption's language code
    language_column: str = "lang"

    def __post_init__(self):
        for name in ("min_caption_words", "min_caption_chars", "min_image_size"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        m = self.max_caption_words
        require(m is None or m >= 1, "max_caption_words", m, ">= 1 (or null: no limit)")
        r = self.max_aspect_ratio
        require(r is None or r >= 1.0, "max_aspect_ratio", r, ">= 1 (or null: no limit)")


class BasicFilterStage(Stage):
    name: ClassVar[str] = "basic_filter"
    Config = Config
    reject_advice: ClassVar[dict[str, str]] = {
        "caption_too_short": "captions are shorter than basic_filter's min_caption_words / min_caption_chars "
        "(an empty caption column? check input.caption_col)",
        "image_too_small": "images are smaller than basic_filter's min_image_size (DataComp: 200)",
    }

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def inputs(self) -> tuple[str, ...]:
        # sizes are optional (unknown sizes pass); a missing language column would drop every row
        return (self.config.language_column,) if self.config.languages else ()

    def process_batch(self, batch: Batch) -> Batch:
        c = self.config
        out = dict(batch)
        n = batch_len(batch)
        decided = np.zeros(n, dtype=bool)

        def drop(mask: np.ndarray, reason: str, detail) -> None:
            mask = mask & ~decided
            idx = np.flatnonzero(mask)
            reject(out, mask, self.name, reason, [detail(i) for i in idx])
            decided[idx] = True

        captions = [cap if isinstance(cap, str) else "" for cap in batch.get("caption", [None] * n)]
        words = np.array([len(cap.split()) for cap in captions], dtype=np.int64)
        chars = np.array([len(cap) for cap in captions], dtype=np.int64)
        short = (words < c.min_caption_words) | (chars < c.min_caption_chars)
        drop(
            short,
            "caption_too_short",
            lambda i: {
                "words": words[i],
                "chars": chars[i],
                "min_words": c.min_caption_words,
                "min_chars": c.min_caption_chars,
            },
        )
        if c.max_caption_words is not None:
            drop(
                words > c.max_caption_words,
                "caption_too_long",
                lambda i: {"words": words[i], "max_words": c.max_caption_words},
            )

        w, h = self._sizes(batch, n)
        known = (w > 0) & (h > 0)
        short_side, long_side = np.minimum(w, h), np.maximum(w, h)
        drop(
            known & (short_side < c.min_image_size),
            "image_too_small",
            lambda i: {"width": w[i], "height": h[i], "min_image_size": c.min_image_size},
        )
        if c.max_aspect_ratio is not None:
            ratio = np.where(known, long_side / np.maximum(short_side, 1), 1.0)
            drop(
                ratio > c.max_aspect_ratio,
                "aspect_ratio_too_large",
                lambda i: {
                    "width": w[i],
                    "height": h[i],
                    "aspect_ratio": round(float(ratio[i]), 4),
                    "max_aspect_ratio": c.max_aspect_ratio,
                },
            )

        if c.languages:
            langs = batch.get(c.language_column, np.full(n, None, dtype=object))
            wrong = np.array([lang not in c.languages for lang in langs], dtype=bool)
            drop(wrong, "caption_language", lambda i: {"language": langs[i], "languages": list(c.languages)})
        return out

    def _sizes(self, batch: Batch, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Widths and heights (``-1`` where unknown): original sizes first."""
        w = np.full(n, -1, dtype=np.int64)
        h = np.full(n, -1, dtype=np.int64)
        pairs = [("width", "height")]
        if self.config.use_original_size:
            pairs.insert(0, ("original_width", "original_height"))
        for wc, hc in reversed(pairs):  # later pairs take precedence: originals last
            if wc in batch and hc in batch:
                bw, bh = _floats(batch[wc]), _floats(batch[hc])
                have = np.isfinite(bw) & np.isfinite(bh) & (bw > 0) & (bh > 0)
                w[have], h[have] = bw[have].astype(np.int64), bh[have].astype(np.int64)
        return w, h


def _floats(col: np.ndarray) -> np.ndarray:
    if col.dtype != object:
        return col.astype(np.float64)
    return np.array([float(v) if isinstance(v, (int, float, np.number)) else np.nan for v in col], dtype=np.float64)
