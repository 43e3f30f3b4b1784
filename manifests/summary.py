"""A run's manifest in a few lines for a terminal: what ``pairforge manifest
show`` prints and the demo ends with (one text, one place)."""

from __future__ import annotations


def summary_lines(man: dict, location: str) -> list[str]:
    """The run at ``location`` (its folder or prefix, as the user named it):
    versions, when and where it ran, rows in and out, a line per stage with
    its drops per reason, then a crawl's hosts and deferred retries."""
    c = man["counts"]
    ray = man["ray"]
    where = f"ray at {ray.get('address')} ({ray.get('nodes')} nodes)" if ray.get("runner") == "ray" else "in process"
    lines = [
        f"run:      {location}",
        f"format:   {man['format']}   pairforge {man['versions'].get('pairforge')}   ray {man['versions'].get('ray')}",
        f"ran:      {man['timing']['started']}  {man['timing']['wall_seconds']:.1f}s  {where}",
        f"rows:     {c['input']} in, {c['ok']} in shards, {c['rejected']} rejected",
        f"shards:   {len(man['shards'])}",
        "",
        f"{'stage':<16}{'in':>10}{'out':>10}{'seconds':>10}  dropped",
    ]
    for st in man["stages"]:
        dropped = ", ".join(f"{r}={n}" for r, n in st["dropped"].items()) or "-"
        lines.append(f"{st['name']:<16}{st['in']:>10}{st['out']:>10}{st.get('seconds', 0):>10.1f}  {dropped}")
    for name, crawl in (man.get("crawl") or {}).items():  # per-host figures of a crawl (docs/crawling.md)
        h = crawl.get("hosts") or {}
        if h:
            robots = ", ".join(f"{k}={v}" for k, v in (h.get("robots") or {}).items()) or "-"
            lines += [
                "",
                f"{name}: {h['hosts']} hosts, {h['requests']} requests, {h['http_429']} answered 429, "
                f"{h['pauses']} pauses, {h['down']} down; robots.txt: {robots}",
            ]
            for t in h.get("top", [])[:5]:
                lines.append(f"  {t['host']:<40}{t['rows']:>8} rows{t['requests']:>8} requests{t['http_429']:>6} 429s")
        for reason, c in (crawl.get("deferred_retry") or {}).items():
            lines.append(f"  deferred retry {reason}: {c['recovered']} of {c['tried']} recovered")
    return lines + _balance_lines(man)


def _balance_lines(man: dict) -> list[str]:
    """MetaCLIP's balancing: the largest entries, rows before -> after (ids:
    lines of the entries file; ``docs/metaclip.md``)."""
    from pairforge.stages.common.balancing import summary

    bal = summary(next((f for f in man.get("fits") or [] if f.get("stage") == "balance"), None), top=10)
    if bal is None:
        return []
    return [
        "",
        f"balance:  t={bal['t']}, {bal['entries_used']} entries used, {bal['entries_over_t']} over t",
        "          largest (entry: rows before -> after): " + ", ".join(f"{i}: {b}->{a}" for i, b, a in bal["top"]),
    ]
