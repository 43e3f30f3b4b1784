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

#: more than this share of the rows rejected: the last line says why
REJECTED_SHARE = 0.5


def top_reasons(manifest: dict, n: int = 3) -> list[tuple[str, str, int]]:
    """The ``n`` commonest (stage, reason, rows) of a manifest's rejects."""
    found = [(st["name"], r, int(c)) for st in manifest.get("stages", []) for r, c in st.get("dropped", {}).items()]
    return sorted(found, key=lambda t: (-t[2], t[0], t[1]))[:n]


def advice_of(stages) -> dict[tuple[str, str], str]:
    """(stage, reason) -> advice, from what each stage declares
    (``Stage.reject_advice``)."""
    return {(st.name, reason): text for st in stages for reason, text in st.reject_advice.items()}


def summary(manifest: dict, seconds: float, shards: int, advice: dict[tuple[str, str], str] | None = None) -> str:
    """The run's last line: samples, rejects and, when more than half of the
    rows were rejected, the top reasons and what to do about the first
    (``advice``: :func:`advice_of` the run's stages)."""
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
        hint = (advice or {}).get(reasons[0][:2])
        if hint:
            line += f": {hint}"
    if c["ok"] == 0:
        line += f". No row reached a shard (exit {EXIT_NO_SAMPLES}); every row is in rejects/"
    return line


def exit_code(manifest: dict) -> int:
    """``EXIT_NO_SAMPLES`` when no row reached a shard, else ``EXIT_OK``."""
    return EXIT_NO_SAMPLES if manifest["counts"]["ok"] == 0 else EXIT_OK
