"""The report's figures for the safety and quality signals: per signal
column a histogram of the kept rows and of the rows its stage dropped, with
the threshold as a line (``punsafe``, ``text_area``, each head's score),
the caption languages' probabilities with the commonest languages, and the
faces blurred per image.

Why on its own: :mod:`manifests.report` decides the page; this module only
knows which columns are signals and where their thresholds are recorded
(the job's settings in ``manifest.json``), so a new signal is a line here,
not a branch there. It reads no file itself.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pairforge.manifests.report_plots import DROPPED, KEPT, LINE, _figure, _finite, _png

#: column -> (its stage, the option holding its threshold, a title, what the x axis is, the dropped side)
SIGNALS = {
    "punsafe": ("safety", "nsfw_threshold", "NSFW score", "punsafe (NudeNet: exposed body parts)", "above"),
    "text_area": (
        "safety",
        "text_threshold",
        "Text in images",
        "text_area (share of the image in text boxes)",
        "above",
    ),
}
FIXED = ("lang", "lang_prob", "num_faces")


def columns(man: dict) -> list[str]:
    """The signal columns the report reads from the shards and the rejects."""
    heads = [c["name"] for c in man.get("schema") or [] if c.get("stage") == "heads"]
    return [*SIGNALS, *FIXED, *heads]


def _settings(man: dict, stage: str) -> dict:
    for st in (man.get("job") or {}).get("stages") or []:
        if isinstance(st, dict) and st.get("name") == stage:
            return st
    return {}


def _split(samples, rejects, col: str, stage: str):
    kept = samples[col] if col in samples.columns else []
    dropped = []
    if {"stage", col} <= set(rejects.columns):
        dropped = rejects.loc[rejects["stage"] == stage, col]
    return _finite(kept), _finite(dropped)


def histogram(kept, dropped, cut: float | None, stage: str, xlabel: str) -> bytes | None:
    """Kept and dropped values of one signal, the threshold as a line."""
    if not len(kept) and not len(dropped):
        return None
    plt, fig, (ax,) = _figure()
    both = np.concatenate([kept, dropped])
    lo, hi = float(both.min()), float(both.max())
    if cut is not None:
        lo, hi = min(lo, cut), max(hi, cut)
    bins = np.linspace(lo, hi, 31) if hi > lo else 10
    if len(kept):
        ax.hist(kept, bins=bins, color=KEPT, alpha=0.75, label=f"kept ({len(kept)})")
    if len(dropped):
        ax.hist(dropped, bins=bins, color=DROPPED, alpha=0.75, label=f"dropped by {stage} ({len(dropped)})")
    if cut is not None:
        ax.axvline(cut, color=LINE, linestyle="--", linewidth=1.5, label=f"threshold {cut:.3g}")
    ax.set_yscale("log")  # signals are mostly near 0: the tail is what matters
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images (log)")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plots(man: dict, samples, rejects) -> list[tuple[str, str, bytes | None, str]]:
    """``(file stem, title, png, note)`` per signal the run has values of."""
    out = []
    signals = dict(SIGNALS)
    for i, head in enumerate(_settings(man, "heads").get("heads") or []):
        signals[head["name"]] = ("heads", i, f"Head: {head['name']}", f"{head['name']} ({head.get('kind', 'mlp')} head)",
                                 head.get("drop", "below"))  # fmt: skip
    for col, (stage, key, title, xlabel, side) in signals.items():
        kept, dropped = _split(samples, rejects, col, stage)
        if not len(kept) and not len(dropped):
            continue
        cfg = _settings(man, stage)
        cut = (cfg.get("heads") or [{}])[key].get("threshold") if stage == "heads" else cfg.get(key)
        cut = float(cut) if cut is not None else None
        note = f"rows {side} the threshold are dropped" if cut is not None else "no threshold: scored only"
        if len(kept):
            note += f"; kept: median {np.median(kept):.3g}, max {kept.max():.3g}"
        out.append((f"signal-{col}", title, histogram(kept, dropped, cut, stage, xlabel), note))
    if "lang_prob" in samples.columns and len(samples):
        langs = Counter(str(x) for x in samples.get("lang", []))
        top = ", ".join(f"{k or '(none)'} {v / len(samples):.0%}" for k, v in langs.most_common(6))
        png = histogram(_finite(samples["lang_prob"]), np.zeros(0), None, "language", "lang_prob (fastText LID-176)")
        out.append(("signal-lang", "Caption language", png, f"kept rows by language: {top}"))
    if "num_faces" in samples.columns and len(samples):
        faces = _finite(samples["num_faces"])
        faces = faces[faces >= 0]
        note = f"{int((faces > 0).sum())} of {len(faces)} kept images had faces blurred ({int(faces.sum())} faces)"
        out.append(("signal-faces", "Faces blurred", _faces(faces), note))
    return out


def _faces(counts: np.ndarray) -> bytes | None:
    if not len(counts):
        return None
    plt, fig, (ax,) = _figure()
    edges = np.arange(0, counts.max() + 2) - 0.5
    _, _, bars = ax.hist(counts, bins=edges, color=KEPT)
    ax.bar_label(bars, fontsize=7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("faces blurred per image")
    ax.set_ylabel("images")
    return _png(plt, fig)
