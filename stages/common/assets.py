"""Short names for the weights this repository ships (``pipeline/assets``).

Why: the shipped scorer and detector used to be given by absolute path
(``pretrained: /home/me/pairforge/pipeline/assets/pf-tiny-scorer.pt``), which
differs on every machine and is refused when mistyped as a name. A job may
say ``pretrained: pf-tiny-scorer`` (``clip_score``, ``regions``'
``clip_pretrained``, ``pairforge train --pretrained``) or ``weights:
pf-tiny-detector`` (``regions``); the job keeps the short name (so a resume
on another checkout compares equal) and each loader resolves it here.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "pipeline" / "assets"
#: short name -> the shipped file
SHIPPED = {
    "pf-tiny-scorer": ASSETS_DIR / "pf-tiny-scorer.pt",
    "pf-tiny-detector": ASSETS_DIR / "pf-tiny-detector.pt",
}


def resolve(value: str | None) -> str | None:
    """The file a shipped asset's short name stands for; any other value as it is."""
    return str(SHIPPED[value]) if isinstance(value, str) and value in SHIPPED else value
