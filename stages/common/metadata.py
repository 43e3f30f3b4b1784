"""Metadata entries and how a caption matches them (MetaCLIP's first step).

Why a module of its own: the ``metadata_match`` stage, its tests and
``bench/balance.py`` need the same three things, and none of them needs a
stage: the entry list read from a file, the normal form both sides are
compared in, and the matcher. Keeping the naive loop (:func:`match_naive`)
beside the automaton (:class:`Matcher`) is what lets a test hold them
against each other and against a hand-checked table.

* **Entries** come from a file: one per line, or MetaCLIP's ``metadata.json``
  (a JSON list of strings). An entry's id is its position in the file (0-based
  line or list index), so a user can map ids back with the file alone; a later
  entry with the same normal form as an earlier one is skipped (it would match
  exactly the same captions and double every count), as are blank lines.
  ``wordnet`` names the offline default, built from Debian's WordNet by
  ``scripts/build_wordnet_entries.py`` (``make setup`` installs it into the
  virtual environment; never committed).
* **Normal form**: Unicode NFKC, then ``casefold`` (``"Straße"`` and
  ``"STRASSE"`` are the same caption), applied to entries and captions alike.
* **Match**: an entry matches where it is a substring of the caption
  (case-insensitive), as the issue asks. With ``word_boundaries`` the
  character before and after the match must not continue a word (a letter or
  digit of a spaced script, or ``_``); an entry edge in a script written
  without spaces (Chinese, Japanese, Thai, ...) needs no boundary there, as in
  MetaCLIP's ``get_spaced_metadata``. MetaCLIP's released matcher is
  space-bounded and case-sensitive (``f" {entry} " in spacing(text)``);
  ``word_boundaries: true`` is the closer of the two modes to it.

The automaton is pyahocorasick's (a C Aho-Corasick trie): one pass over the
caption finds every entry, overlaps included, whatever the entry count
(``bench/balance.py`` measures it against the naive loop). :func:`matcher`
builds it once per process and keeps it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import sys
import unicodedata
from pathlib import Path

import numpy as np

#: the ``entries`` value that names the offline WordNet default
WORDNET = "wordnet"


def wordnet_path() -> Path:
    """Where ``make setup`` installs the WordNet entries: inside the virtual
    environment every worker of this machine runs in (``sys.prefix``)."""
    return Path(sys.prefix) / "share" / "pairforge" / "wordnet_entries.txt"


def resolve(entries: str) -> Path:
    return wordnet_path() if entries == WORDNET else Path(entries).expanduser()


def normalize(text: str) -> str:
    """The form captions and entries are compared in."""
    return unicodedata.normalize("NFKC", text).casefold()


def parse_entries(data: bytes, name: str) -> list[str]:
    """The raw entries of a file's bytes: a JSON list of strings when ``name``
    ends with ``.json``, else one entry per line. Raises ``ValueError`` saying
    what is wrong and where."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start})") from None
    if name.endswith(".json"):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{name} is not JSON: {e}") from None
        if not isinstance(items, list):
            raise ValueError(
                f"{name}: expected a JSON list of strings (MetaCLIP's metadata.json), got {type(items).__name__}"
            )
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ValueError(f"{name}: item {i} is {item!r}, not a string")
        return items
    lines = text.split("\n")  # not splitlines(): ids are line numbers as editors and `wc -l` count them
    return lines[:-1] if lines and lines[-1] == "" else lines


class Entries:
    """The distinct entries of a file in normal form, each with its id (its
    position in the file)."""

    def __init__(self, raw: list[str]):
        self.size = len(raw)  # ids run from 0 to size - 1
        self.ids: list[int] = []
        self.words: list[str] = []
        seen: set[str] = set()
        for i, entry in enumerate(raw):
            word = normalize(entry.strip())
            if word and word not in seen and "\x00" not in word:  # NUL separates captions in Matcher
                seen.add(word)
                self.ids.append(i)
                self.words.append(word)
        self.skipped = self.size - len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def read_entries(path: Path) -> tuple[Entries, str]:
    """The entries of ``path`` and the SHA-256 of its bytes."""
    data = path.read_bytes()
    return Entries(parse_entries(data, path.name)), hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ boundaries


def unspaced(ch: str) -> bool:
    """A character of a script written without spaces between words (CJK,
    kana, Thai, Lao, Burmese, Khmer, Tibetan): no word boundary is asked of it."""
    o = ord(ch)
    return (
        0x2E80 <= o <= 0x9FFF  # CJK radicals, kana, CJK ideographs (ext. A included)
        or 0xF900 <= o <= 0xFAFF  # CJK compatibility ideographs
        or 0x20000 <= o <= 0x3134F  # CJK extensions B-G
        or 0x0E00 <= o <= 0x0EFF  # Thai, Lao
        or 0x0F00 <= o <= 0x0FFF  # Tibetan
        or 0x1000 <= o <= 0x109F  # Burmese
        or 0x1780 <= o <= 0x17FF  # Khmer
        or 0xFF66 <= o <= 0xFF9F  # half-width katakana
    )


def word_char(ch: str) -> bool:
    """A character that continues a word of a spaced script."""
    return (ch.isalnum() or ch == "_") and not unspaced(ch)


def bounded(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` (a match) stands as a word: no word
    character just outside an edge that is itself a word character."""
    if word_char(text[start]) and start > 0 and word_char(text[start - 1]):
        return False
    return not (word_char(text[end - 1]) and end < len(text) and word_char(text[end]))


# ------------------------------------------------------------------ matching


_WORD: dict[int, bool] = {}
#: word_char of the ASCII code points
_ASCII_WORD = np.array([word_char(chr(c)) for c in range(128)], dtype=bool)


def word_flags(text: str) -> np.ndarray:
    """:func:`word_char` of each character of ``text``, as a bool array
    (a table for ASCII, a memo per code point for the rest)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    flags = _ASCII_WORD[np.minimum(cp, 127)]
    wide = cp > 127
    if wide.any():
        points, inv = np.unique(cp[wide], return_inverse=True)
        for u in points.tolist():
            if u not in _WORD:
                _WORD[u] = word_char(chr(u))
        flags[wide] = np.array([_WORD[u] for u in points.tolist()], dtype=bool)[inv]
    return flags


class Matcher:
    """Every entry of :class:`Entries` found in captions, as sorted id arrays.

    The automaton stores plain ints (``STORE_INTS``), the entry id. Substring
    matches are collected per caption into a set (WordNet's one-letter
    entries repeat dozens of times a caption; a set drops the repeats as they
    come). With word boundaries, a batch of captions is matched in one pass:
    their normal forms joined by ``"\\x00"`` (no entry holds it, so no match
    spans two captions), the raw matches read as one int64 array (no Python
    code runs per match), the boundaries checked in numpy against arrays of
    entry lengths and edge kinds, each match's caption found by its end
    position. ``bench/balance.py`` measured both ways in both modes."""

    def __init__(self, entries: Entries, word_boundaries: bool = False):
        import ahocorasick

        self.word_boundaries = word_boundaries
        self.entries = len(entries)
        self.span = max(entries.size, 1)
        self.automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        size = entries.size if word_boundaries else 0
        self.length = np.zeros(size, dtype=np.int64)
        self.left = np.zeros(size, dtype=bool)  # starts with a word character: the text before must not be one
        self.right = np.zeros(size, dtype=bool)
        for i, word in zip(entries.ids, entries.words):
            self.automaton.add_word(word, i)
            if word_boundaries:
                self.length[i], self.left[i], self.right[i] = len(word), word_char(word[0]), word_char(word[-1])
        if len(entries):
            self.automaton.make_automaton()

    def match_many(self, captions) -> list[np.ndarray]:
        """The sorted int32 entry ids of each caption (not a string: none)."""
        n = len(captions)
        texts = [normalize(c).replace("\x00", " ") if isinstance(c, str) else "" for c in captions]
        if not self.entries or not n:
            return [np.zeros(0, np.int32) for _ in range(n)]
        if not self.word_boundaries:  # every raw match counts: a set per caption drops repeats as they come
            it, second = self.automaton.iter, operator.itemgetter(1)  # map(itemgetter): no bytecode per match
            return [np.array(sorted(set(map(second, it(t)))), dtype=np.int32) for t in texts]
        joined = "\x00" + "\x00".join(texts) + "\x00"
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        starts = np.cumsum(lens + 1) - lens  # where each caption starts in ``joined``
        flat = np.fromiter(itertools.chain.from_iterable(self.automaton.iter(joined)), dtype=np.int64)
        end, ids = flat[0::2], flat[1::2]
        if len(ids):
            flags = word_flags(joined)  # False at the separators, which also pad both ends
            begin = end + 1 - self.length[ids]
            ok = ~((self.left[ids] & flags[begin - 1]) | (self.right[ids] & flags[end + 1]))
            end, ids = end[ok], ids[ok]
        row = np.searchsorted(starts, end, side="right") - 1
        pairs = np.unique(row * self.span + ids)  # each id once a caption, sorted by caption then id
        row, ids = pairs // self.span, (pairs % self.span).astype(np.int32)
        return np.split(ids, np.searchsorted(row, np.arange(1, n)))

    def match(self, caption) -> list[int]:
        return self.match_many([caption])[0].tolist()

    def memory(self) -> int:
        """Bytes of the trie, as pyahocorasick counts them."""
        return int(self.automaton.get_stats()["total_size"]) if self.entries else 0


def match_naive(entries: Entries, caption, word_boundaries: bool = False) -> list[int]:
    """The same matches by a loop over every entry (MetaCLIP's original
    ``substr_matching``): the reference for tests and the benchmark's baseline."""
    if not isinstance(caption, str):
        return []
    text = normalize(caption)
    out = []
    for i, word in zip(entries.ids, entries.words):
        if not word_boundaries:
            if word in text:
                out.append(i)
            continue
        at = text.find(word)
        while at >= 0:
            if bounded(text, at, at + len(word)):
                out.append(i)
                break
            at = text.find(word, at + 1)
    return sorted(out)


_MATCHERS: dict[tuple[str, str, bool], Matcher] = {}


def matcher(path: Path, word_boundaries: bool, sha256: str | None = None) -> Matcher:
    """This process's matcher for ``path`` (built on first use, then kept).
    ``sha256``: the digest the driver saw; a worker that reads other bytes
    (another file at that path on its node) raises instead of matching
    against a different list."""
    key = (str(path), sha256 or "", word_boundaries)
    m = _MATCHERS.get(key)
    if m is None:
        entries, digest = read_entries(path)
        if sha256 and digest != sha256:
            raise RuntimeError(
                f"metadata entries {path}: this worker reads a different file (sha256 {digest[:12]}…) "
                f"from the one the job was checked with ({sha256[:12]}…); every node needs the same file"
            )
        m = _MATCHERS[key] = Matcher(entries, word_boundaries)
    return m
