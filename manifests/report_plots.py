"""The histograms of ``pairforge report`` as PNG bytes (matplotlib, Agg).

Why a module of its own: the report's reader (``manifests/report.py``)
decides *what* to plot from a run's files; these functions only draw
numbers they are given, so each can be tried on plain arrays, and the
report stays importable where no figure is drawn. Every function returns
``None`` when there is nothing to draw, and the page leaves the figure out.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np

#: matplotlib's default colour cycle, fixed here so kept/dropped read the same in every figure
KEPT, DROPPED, LINE = "#1f77b4", "#d62728", "#222222"


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.3), dpi=100, squeeze=False)
    return plt, fig, list(axes[0])


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: the same bytes every time
    plt.close(fig)
    return buf.getvalue()


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def clip_score(kept, dropped, cut: float | None, cut_label: str) -> bytes | None:
    """Scores of the kept pairs and of the pairs the clip_score stage
    dropped, with the cut as a vertical line."""
    kept, dropped = _finite(kept), _finite(dropped)
    if not len(kept) and not len(dropped):
        return None
    plt, fig, (ax,) = _figure()
    both = np.concatenate([kept, dropped])
    bins = np.linspace(both.min(), both.max(), 31) if both.min() < both.max() else 10
    if len(kept):
        ax.hist(kept, bins=bins, color=KEPT, alpha=0.75, label=f"kept ({len(kept)})")
    if len(dropped):
        ax.hist(dropped, bins=bins, color=DROPPED, alpha=0.75, label=f"dropped by clip_score ({len(dropped)})")
    if cut is not None and np.isfinite(cut):
        ax.axvline(cut, color=LINE, linestyle="--", linewidth=1.5, label=f"{cut_label} {cut:.3g}")
    ax.set_xlabel("clip_score (cosine of image and caption embeddings)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def image_sizes(panels: dict[str, tuple]) -> tuple[bytes | None, list[str]]:
    """Widths and heights of the kept images, a panel per entry of ``panels``
    (title -> ``(widths, heights)``; e.g. as stored, as downloaded). A panel
    whose images all have one size becomes a line of text instead."""
    drawn, notes = [], []
    for title, (w, h) in panels.items():
        w, h = _finite(w), _finite(h)
        w, h = w[w > 0], h[h > 0]  # -1: the size was never known
        if not len(w) and not len(h):
            continue
        both = np.concatenate([w, h])
        if len(w) and len(h) and w.min() == w.max() and h.min() == h.max():
            notes.append(f"every {title} is {int(w[0])}x{int(h[0])} ({len(w)} images)")
        else:
            drawn.append((title, w, h, both.min(), both.max()))
    if not drawn:
        return None, notes
    plt, fig, axes = _figure(len(drawn))
    for ax, (title, w, h, lo, hi) in zip(axes, drawn):
        bins = np.linspace(lo, hi, 31) if hi - lo > 30 else np.arange(lo, hi + 2) - 0.5
        ax.hist([w, h], bins=bins, color=[KEPT, "#ff7f0e"], label=["width", "height"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("pixels")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    return _png(plt, fig), notes


def regions(num_regions, labels: Counter) -> bytes | None:
    """Boxes per kept image, and the most frequent region labels."""
    n = _finite(num_regions).astype(np.int64)
    if not len(n):
        return None
    plt, fig, axes = _figure(2 if labels else 1)
    edges = np.arange(n.min(), n.max() + 2) - 0.5
    _, _, bars = axes[0].hist(n, bins=edges, color=KEPT)
    axes[0].bar_label(bars, fontsize=7)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_xlabel("regions per image")
    axes[0].set_ylabel("images")
    if labels:
        top = labels.most_common(15)[::-1]
        axes[1].barh([str(k) for k, _ in top], [v for _, v in top], color=KEPT)
        axes[1].set_xlabel("boxes")
        axes[1].set_title(f"labels ({len(labels)} distinct)", fontsize=10)
        axes[1].tick_params(axis="y", labelsize=8)
        axes[1].xaxis.get_major_locator().set_params(integer=True)
    return _png(plt, fig)


def phash_distances(duplicates, nearest, max_distance: int | None) -> bytes | None:
    """Hamming distances: each pHash duplicate to its survivor (from the
    rejects' detail), each kept image to its nearest other kept image."""
    duplicates, nearest = _finite(duplicates), _finite(nearest)
    if not len(duplicates) and not len(nearest):
        return None
    plt, fig, (ax,) = _figure()
    top = int(max(np.concatenate([duplicates, nearest]).max(), max_distance or 0))
    edges = np.arange(0, top + 2) - 0.5
    if len(nearest):
        ax.hist(nearest, bins=edges, color=KEPT, alpha=0.75, label=f"kept: nearest other kept ({len(nearest)})")
    if len(duplicates):
        ax.hist(duplicates, bins=edges, color=DROPPED, alpha=0.75, label=f"dropped: to survivor ({len(duplicates)})")
    if max_distance is not None:
        ax.axvline(max_distance + 0.5, color=LINE, linestyle="--", linewidth=1.5, label=f"max_distance {max_distance}")
    ax.set_xlabel("pHash Hamming distance (bits of 64)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8, loc="upper right")
    return _png(plt, fig)


def nearest_hamming(hashes_hex: list[str], block: int = 512) -> np.ndarray:
    """For each 64-bit hex hash, the Hamming distance to its nearest other
    hash in the list (exact, blocked; callers pass a sample of a few
    thousand). Unparsable hashes are left out."""
    vals = []
    for h in hashes_hex:
        try:
            vals.append(int(str(h), 16) & 0xFFFFFFFFFFFFFFFF)
        except ValueError:
            continue
    x = np.array(vals, dtype=np.uint64)
    if len(x) < 2:
        return np.zeros(0)
    best = np.full(len(x), 65, dtype=np.int64)
    for s in range(0, len(x), block):
        d = _popcount(x[s : s + block, None] ^ x[None, :])
        d[np.arange(len(d)), np.arange(s, s + len(d))] = 65  # not itself
        best[s : s + block] = d.min(axis=1)
    return best


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount(a: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has ``bitwise_count``; older, a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a).astype(np.int64)
    return _BYTE_BITS[np.ascontiguousarray(a).view(np.uint8)].reshape(*a.shape, 8).sum(axis=-1)


def entry_counts(before: tuple, after: tuple, t: int | None) -> bytes | None:
    """MetaCLIP's figure: rows per metadata entry, entries ranked by count,
    before and after balancing, on log axes; ``before`` / ``after`` are
    (rank, count) corners of a step line (``stages.common.balancing.rank_curve``).
    The cap ``t`` is a line."""
    (xb, yb), (xa, ya) = before, after
    if not len(xb):
        return None
    plt, fig, (ax,) = _figure()
    ax.plot(xb, yb, color=DROPPED, label=f"before ({int(xb[-1]):,} entries)")
    if len(xa):
        ax.plot(xa, ya, color=KEPT, label=f"after ({int(xa[-1]):,} entries)")
    if t:
        ax.axhline(t, color=LINE, linestyle="--", linewidth=1.2, label=f"t = {t:,}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries, ranked by rows")
    ax.set_ylabel("rows per entry (log bins)")
    ax.legend(fontsize=8)
    return _png(plt, fig)
