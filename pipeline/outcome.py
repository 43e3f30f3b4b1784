"""What a run ended with, for a person and for a shell: the exit codes of
``pairforge`` and the run's last line.

Why this exists: a job whose every URL was refused used to end with exit 0
and ``done in 14.0s: 0 samples in 3 shards, 30 rejected``; the reason
(``blocked_address=30``) was only in ``pairforge manifest show``. Now the
last line names the top reject reasons whenever more than half of the rows
were rejected, with what to do about the most common ones, and a run that
put no row in a shard exits non-zero, so a script or a scheduler sees it.

The codes (``docs/troubleshooting.md`` lists them with what to do):
"""

from __future__ import annotations

#: the run finished and at least one sample is in a shard
EXIT_OK = 0
#: an unexpected error (a Python traceback); also ``manifest verify`` finding
#: a problem and ``manifest diff`` finding a difference
EXIT_ERROR = 1
#: the job file or the command line is wrong, or a stage raised; nothing ran
#: (or the run stopped, resumable): the message names the key and the value
EXIT_CONFIG = 2
#: the run finished, but no row reached a shard: every row is in ``rejects/``
EXIT_NO_SAMPLES = 3
#: the URL lists hold no rows: nothing was run
EXIT_EMPTY_INPUT = 4
#: the Ray cluster at ``--address`` (or ``ray.address``, ``$RAY_ADDRESS``) does not answer
EXIT_UNREACHABLE = 5
#: interrupted (Ctrl-C); ``--resume`` finishes the run
EXIT_INTERRUPTED = 130

#: what to do about a reject reason that ends many runs: (stage, reason) -> advice
ADVICE = {
    ("download", "blocked_address"): (
        "the URLs point at loopback or private addresses, which download refuses; for a server of your own, "
        "allow its network: download's allow_networks: ['127.0.0.0/8']"
    ),
    (
        "download",
        "connection_error",
    ): "the hosts refused or dropped the connections: are they up, and reachable from the workers?",
    (
        "download",
        "timeout",
    ): "the hosts did not answer in time: raise download's timeout, or check the workers' network",
    ("download", "invalid_url"): "the url column does not hold http(s) URLs: check input.url_col",
    ("download", "decode_error"): "the URLs answer with something that is not an image (an HTML page?)",
    ("download", "image_too_small"): "the images are smaller than download's min_image_size",
    ("basic_filter", "caption_too_short"): (
        "captions are shorter than basic_filter's min_caption_words / min_caption_chars (an empty caption "
        "column? check input.caption_col)"
    ),
    ("basic_filter", "image_too_small"): "images are smaller than basic_filter's min_image_size (DataComp: 200)",
    ("clip_score", "clip_score_below_threshold"): "clip_score's threshold is above most pairs' scores",
}

#: more than this share of the rows rejected: the last line says why
REJECTED_SHARE = 0.5


def top_reasons(manifest: dict, n: int = 3) -> list[tuple[str, str, int]]:
    """The ``n`` commonest (stage, reason, rows) of a manifest's rejects."""
    found = [(st["name"], r, int(c)) for st in manifest.get("stages", []) for r, c in st.get("dropped", {}).items()]
    return sorted(found, key=lambda t: (-t[2], t[0], t[1]))[:n]


def summary(manifest: dict, seconds: float, shards: int) -> str:
    """The run's last line: samples, rejects and, when more than half of the
    rows were rejected, the top reasons and what to do about the first."""
    c = manifest["counts"]
    line = f"done in {seconds:.1f}s: {c['ok']} samples in {shards} shards, {c['rejected']} rejected"
    nulls = sum(int(f.get("null_captions", 0)) for f in manifest.get("input", {}).get("files", []))
    if nulls:
        line += f"; {nulls} row(s) had no caption (null in the URL list: kept with caption '')"
    total = max(int(c["input"]), 1)
    if c["rejected"] / total <= REJECTED_SHARE:
        return line
    reasons = top_reasons(manifest)
    if reasons:
        line += " (" + ", ".join(f"{stage}/{reason} {n}" for stage, reason, n in reasons) + ")"
        advice = ADVICE.get(reasons[0][:2])
        if advice:
            line += f": {advice}"
    if c["ok"] == 0:
        line += f". No row reached a shard (exit {EXIT_NO_SAMPLES}); every row is in rejects/"
    return line


def exit_code(manifest: dict) -> int:
    """``EXIT_NO_SAMPLES`` when no row reached a shard, else ``EXIT_OK``."""
    return EXIT_NO_SAMPLES if manifest["counts"]["ok"] == 0 else EXIT_OK
