"""The HTML of ``pairforge report``: plain strings from what
``manifests/report.py`` gathered.

Why apart: the page is web text around web data. Captions, URLs and error
messages come from the crawl, so every value passes through :func:`esc`
here and nowhere else builds markup; the reader never writes HTML. The page
needs no script: sections are anchors, the funnel's bars are CSS widths,
and a Content-Security-Policy forbids scripts and any address but the
page's own files and ``data:`` URIs.
"""

from __future__ import annotations

import html

CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px} nav a{margin-right:12px} .muted{color:#777;font-size:12px}
table{border-collapse:collapse;margin:6px 0} th,td{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#e8eef7;width:160px;height:12px} .bar>div{background:#1f77b4;height:12px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{width:200px;border:1px solid #ddd;border-radius:4px;padding:6px;background:#fafafa;font-size:12px}
.card img,.noimg{width:192px;height:192px;object-fit:contain;background:#eee;display:block}
.noimg{display:flex;align-items:center;justify-content:center;color:#999;text-align:center}
.cap{margin-top:4px;word-wrap:break-word} .key{color:#777;font-family:monospace}
.pair{display:flex;gap:10px;align-items:stretch;margin:8px 0}
.card.neg{border:2px dashed #d62728;background:#fff}
.big{width:330px} .big img,.big .noimg{width:320px;height:320px;object-fit:contain}
.plot img{max-width:100%} td.msg{font-family:monospace;font-size:11px;max-width:420px;word-wrap:break-word}
.rejects .card{width:112px} .rejects .card img,.rejects .noimg{width:100px;height:100px}
td.cap{max-width:260px} .url{font-family:monospace;font-size:11px;word-break:break-all;max-width:300px}
"""


def esc(v) -> str:
    """A value as HTML text (quotes too, so it is safe in attributes)."""
    return html.escape("" if v is None else str(v), quote=True)


def _anchor(stage: str, reason: str) -> str:
    return "r-" + "".join(c if c.isalnum() else "-" for c in f"{stage}-{reason}")


def _img(src, alt, cls="") -> str:
    if not src:
        return f'<div class="noimg {cls}">no image</div>'
    return f'<img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'


def card(s: dict | None, extra: str = "", big: bool = False) -> str:
    """One sample: thumbnail, caption, key (and a note where it is not kept)."""
    if s is None:
        return ""
    src = s.get("regions_img") if big else s.get("img")
    meta = [f'<span class="key">{esc(s["key"])}</span>']
    if s.get("clip_score") is not None:
        meta.append(f"clip {s['clip_score']:.3f}")
    if s.get("size"):
        meta.append(f"{s['size'][0]}x{s['size'][1]}")
    where = f'<div class="muted">{esc(s["where"])}</div>' if s.get("where") else ""
    return (
        f'<div class="card{" big" if big else ""}">{_img(src, s.get("caption") or s["key"])}'
        f'<div class="cap">{esc(s.get("caption"))}</div><div class="muted">{" · ".join(meta)}</div>'
        f"{where}{extra}</div>"
    )


def funnel(man: dict) -> str:
    stages = man.get("stages") or []
    total = max([int((man.get("counts") or {}).get("input") or 0)] + [int(st.get("in") or 0) for st in stages])
    rows = []
    for st in stages:
        name, n_in, n_out = st.get("name", "?"), int(st.get("in") or 0), int(st.get("out") or 0)
        dropped = st.get("dropped") or {}
        reasons = ", ".join(
            f'<a href="#{_anchor(name, r)}">{esc(r)}</a>&nbsp;{int(n)}'
            for r, n in sorted(dropped.items(), key=lambda t: -t[1])
        )
        lost = st.get("survivors_dropped_later") or {}
        if lost:
            reasons += '<div class="muted">survivors dropped later: ' + esc(
                ", ".join(f"{later} {c.get('survivors')} (+{c.get('duplicates')} duplicates)" for later, c in lost.items())
            ) + "</div>"  # fmt: skip
        width = 100.0 * n_out / total if total else 0.0
        rows.append(
            f"<tr><td>{esc(name)}</td><td class=n>{n_in}</td><td class=n>{n_out}</td>"
            f'<td class=n>{n_in - n_out}</td><td><div class=bar><div style="width:{width:.1f}%"></div></div></td>'
            f"<td>{reasons or '-'}</td><td class=n>{float(st.get('seconds') or 0):.1f}</td></tr>"
        )
    head = "<tr><th>stage</th><th>in</th><th>out</th><th>dropped</th><th>kept of input</th><th>dropped by reason</th><th>s</th></tr>"  # fmt: skip
    return f'<table id="funnel">{head}{"".join(rows)}</table>'


def _num(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def evaluations(evals: list[dict]) -> str:
    """``pairforge eval``'s figures filed under ``OUT/eval/``: the line a
    person reads, then per-class top-1 accuracy with its interval."""
    if not evals:
        return "<p>No evaluation filed (<code>pairforge eval SET --pretrained CKPT --run OUT</code>).</p>"
    parts = []
    for e in evals:
        model = e.get("model") if isinstance(e.get("model"), dict) else {}
        parts.append(
            f"<h3>{esc(e.get('name'))}</h3><p>{esc(e.get('summary'))}</p>"
            f'<div class="muted">model {esc(model.get("name"))}, weights {esc(model.get("pretrained"))}; '
            f"set {esc(e.get('set'))}</div>"
        )
        cls = e.get("classification") if isinstance(e.get("classification"), dict) else {}
        per = cls.get("per_class") if isinstance(cls.get("per_class"), dict) else {}
        rows = []
        for name, v in per.items():
            v = v if isinstance(v, dict) else {}
            ci = v.get("ci95") if isinstance(v.get("ci95"), list) and len(v.get("ci95")) == 2 else [None, None]
            rows.append(
                f'<tr><td>{esc(name)}</td><td class="n">{_num(v.get("value"))}</td>'
                f'<td class="n">{_num(ci[0])}-{_num(ci[1])}</td><td class="n">{esc(v.get("n"))}</td></tr>'
            )
        if rows:
            parts.append(
                "<table><tr><th>class</th><th>top-1</th><th>95% CI (Wilson)</th><th>images</th></tr>"
                + "".join(rows)
                + "</table>"
            )
    return "".join(parts)


def crawl(man: dict) -> str:
    """Per-host figures of each download stage (the manifest's ``crawl``):
    totals, robots.txt outcomes, the deferred retry, the top hosts by rows."""
    parts = []
    for stage, c in (man.get("crawl") or {}).items():
        h = c.get("hosts") or {}
        if h:
            robots = ", ".join(f"{esc(k)} {int(v)}" for k, v in (h.get("robots") or {}).items()) or "-"
            parts.append(
                f"<p><b>{esc(stage)}</b>: {int(h.get('hosts') or 0)} hosts, {int(h.get('requests') or 0)} requests, "
                f"{int(h.get('http_429') or 0)} answered 429, {int(h.get('pauses') or 0)} pauses "
                f"({float(h.get('paused_seconds') or 0):.1f} s), {int(h.get('down') or 0)} times a host was down; "
                f"robots.txt: {robots}</p>"
            )
            cols = ("rows", "requests", "ok", "transient", "http_429", "pauses", "down")
            head = "<tr><th>host</th>" + "".join(f"<th>{c}</th>" for c in cols) + "<th>robots.txt</th></tr>"
            rows = "".join(
                f"<tr><td>{esc(t.get('host'))}</td>"
                + "".join(f"<td class=n>{int(t.get(k) or 0)}</td>" for k in cols)
                + f"<td>{esc(t.get('robots') or '-')}</td></tr>"
                for t in h.get("top") or []
            )
            parts.append(f'<table class="crawl">{head}{rows}</table>')
        retry = c.get("deferred_retry") or {}
        if retry:
            rows = "".join(
                f"<tr><td>{esc(r)}</td><td class=n>{int(v.get('tried') or 0)}</td>"
                f"<td class=n>{int(v.get('recovered') or 0)}</td>"
                f"<td>{esc(', '.join(f'{k} {n}' for k, n in (v.get('failed') or {}).items()) or '-')}</td></tr>"
                for r, v in retry.items()
            )
            head = "<tr><th>first failure</th><th>retried</th><th>recovered</th><th>failed again</th></tr>"
            parts.append(f'<p>Deferred retry</p><table class="crawl">{head}{rows}</table>')
    return "".join(parts) or "<p>No download stage ran.</p>"


def rejects(groups: list[dict]) -> str:
    if not groups:
        return "<p>No row was rejected.</p>"
    parts = [
        '<p class="muted">A run keeps no image of a rejected row; where a duplicate names the row it was '
        "dropped for (<code>duplicate_of</code>), that survivor is shown.</p>"
    ]
    for g in groups:
        shown = f"{len(g['rows'])} of {g['count']}"
        parts.append(
            f'<h3 id="{_anchor(g["stage"], g["reason"])}">{esc(g["stage"])}: {esc(g["reason"])} '
            f'<span class="muted">({shown})</span></h3>'
        )
        has_surv = any(r["survivor"] for r in g["rows"])
        head = "<tr><th>key</th><th>url</th><th>caption</th><th>reason</th><th>error_message</th>"
        head += "<th>survivor</th></tr>" if has_surv else "</tr>"
        body = []
        for r in g["rows"]:
            cells = (
                f'<td class="key">{esc(r["key"])}</td><td class="url">{esc(r["url"])}</td>'
                f'<td class="cap">{esc(r["caption"])}</td><td>{esc(r["reason"])}</td>'
                f'<td class="msg">{esc(r["error_message"][:400])}</td>'
            )
            if has_surv:
                cells += f"<td>{card(r['survivor'])}</td>" if r["survivor"] else "<td>-</td>"
            body.append(f"<tr>{cells}</tr>")
        parts.append(f'<table class="rejects">{head}{"".join(body)}</table>')
    return "".join(parts)


def regions(items: list[dict]) -> str:
    if not items:
        return "<p>This run has no regions (no regions stage, or no box in the samples).</p>"
    cards = []
    for s in items:
        tags = ", ".join(f"{esc(lab)} {sc:.2f}" for lab, sc in s.get("boxes", []))
        cards.append(card(s, f'<div class="muted">{len(s.get("boxes", []))} boxes: {tags}</div>', big=True))
    return f'<div class="grid">{"".join(cards)}</div>'


def confounders(groups: list[dict]) -> str:
    if not groups:
        return "<p>This run has no confounders table.</p>"
    parts = [
        '<p class="muted">Left: the anchor pair; middle: its partner sample (where the row names one); '
        "right, dashed: the hard negative, an image with a caption that does not describe it "
        "(<code>swap_image</code>: the anchor's caption with the partner's image; <code>swap_text</code>: "
        "the anchor's image with the partner's caption; <code>word_order</code>: the anchor's image with "
        "its words in another order).</p>"
    ]
    for g in groups:
        kind = g["kind"]
        parts.append(f'<h3 id="c-{esc(kind)}">{esc(kind)} <span class="muted">({len(g["rows"])} of {g["count"]})</span></h3>')  # fmt: skip
        for r in g["rows"]:
            sim = f"similarity {r['similarity']:.3f}" if r["similarity"] is not None else "no partner"
            rule = f" · rule {esc(r['rule'])}" if r["rule"] else ""
            shows = r["partner"] if kind == "swap_image" else r["anchor"]  # whose image the negative pairs
            img = _img(shows.get("img") if shows else None, r["caption"])
            neg = (
                f'<div class="card neg">{img}<div class="cap">{esc(r["caption"])}</div>'
                f'<div class="muted"><b>{esc(kind)}</b> · {sim}{rule}</div></div>'
            )
            parts.append(f'<div class="pair">{card(r["anchor"])}{card(r["partner"])}{neg}</div>')
    return "".join(parts)


def render(ctx: dict) -> str:
    man = ctx["manifest"]
    counts, timing = man.get("counts") or {}, man.get("timing") or {}
    versions = man.get("versions") or {}
    summary = (
        f"{esc(counts.get('input'))} rows in, {esc(counts.get('ok'))} in shards, "
        f"{esc(counts.get('rejected'))} rejected · {len(man.get('shards') or {})} shards · "
        f"started {esc(timing.get('started'))}, {float(timing.get('wall_seconds') or 0):.1f} s · "
        f"{esc(man.get('format'))}, pairforge {esc(versions.get('pairforge'))}"
    )
    grid = "".join(card(s) for s in ctx["grid"]) or "<p>No sample was kept.</p>"
    plots = (
        "".join(
            f'<div class="plot"><h3>{esc(p["title"])}</h3>'
            + (f'<img src="{esc(p["src"])}" alt="{esc(p["title"])}">' if p["src"] else "")
            + f'<div class="muted">{esc(p["note"])}</div></div>'
            for p in ctx["plots"]
        )
        or "<p>Nothing to plot.</p>"
    )
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (("s-funnel", "funnel"), ("s-pairs", "kept pairs"), ("s-plots", "histograms"),
                     ("s-rejects", "rejects"), ("s-crawl", "hosts"), ("s-regions", "regions"),
                     ("s-confounders", "confounders"), ("s-eval", "evaluation"))
    )  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<link rel="icon" href="data:,">
<title>pairforge report: {esc(ctx["run"])}</title><style>{CSS}</style></head>
<body>
<h1>pairforge report</h1><div class="muted">{esc(ctx["run"])}</div><p>{summary}</p>
<nav>{nav}</nav>
<h2 id="s-funnel">Funnel</h2>{funnel(man)}
<h2 id="s-pairs">Kept pairs <span class="muted">({len(ctx["grid"])} of {esc(counts.get("ok"))}, by SHA-1 of key)</span></h2>
<div class="grid" id="pairs">{grid}</div>
<h2 id="s-plots">Histograms</h2>{plots}
<h2 id="s-rejects">Rejects</h2>{rejects(ctx["rejects"])}
<h2 id="s-crawl">Hosts</h2>{crawl(man)}
<h2 id="s-regions">Regions</h2>{regions(ctx["regions"])}
<h2 id="s-confounders">Confounders</h2>{confounders(ctx["confounders"])}
<h2 id="s-eval">Evaluation</h2>{evaluations(ctx.get("evals") or [])}
</body></html>
"""
