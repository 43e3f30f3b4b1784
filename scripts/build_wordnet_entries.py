"""Build the offline default metadata entries from WordNet (Debian's
``wordnet`` package): the lemmas of every synset, nouns, verbs, adjectives and
adverbs, as MetaCLIP's "WordNet synsets" part of its 500,000 entries.

Why a script and not a committed file: the list is ~2 MB derived from a
package the set-up installs anyway; ``make setup`` runs this and writes it
inside the virtual environment (``stages.common.metadata.wordnet_path``),
where the ``metadata_match`` stage finds it as ``entries: wordnet``.

A lemma is written as words (``hot_dog`` -> ``hot dog``); multi-word lemmas
are kept as bigrams (``--max-words 2``, MetaCLIP's entries are unigrams and
bigrams), longer ones are left out. Adjective markers (``(a)``, ``(p)``,
``(ip)``) are removed. Entries are distinct in the matcher's normal form and
sorted by it, so the file, and every entry id, is the same on every machine
with the same WordNet.

    python scripts/build_wordnet_entries.py [--wordnet /usr/share/wordnet] [--out PATH] [--max-words 2]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pairforge.stages.common.metadata import normalize, wordnet_path

PARTS = ("noun", "verb", "adj", "adv")
_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def lemmas(data_file: Path):
    """The lemmas of each synset line of a WordNet ``data.*`` file."""
    with data_file.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" ")
            count = int(fields[3], 16)  # w_cnt: two hexadecimal digits
            for j in range(count):
                yield _MARKER.sub("", fields[4 + 2 * j])


def build(wordnet: Path, max_words: int) -> list[str]:
    found: dict[str, str] = {}
    for part in PARTS:
        path = wordnet / f"data.{part}"
        if not path.is_file():
            raise SystemExit(f"no {path}: install Debian's wordnet package (apt-get install wordnet)")
        for lemma in lemmas(path):
            words = lemma.replace("_", " ").split()
            if not words or len(words) > max_words:
                continue
            entry = " ".join(words)
            found.setdefault(normalize(entry), entry)
    return [found[k] for k in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=wordnet_path())
    ap.add_argument("--max-words", type=int, default=2)
    args = ap.parse_args(argv)
    entries = build(args.wordnet, args.max_words)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".wordnet-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(entries) + "\n")
    os.replace(tmp, args.out)
    print(f"{len(entries)} WordNet entries -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
