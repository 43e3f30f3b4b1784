"""Word-order confounders: the same words in another order, another meaning.

Winoground (Thrush et al., 2022) showed that CLIP-style models cannot tell
"a mug in some grass" from "some grass in a mug". This module writes such a
caption for a given one, with two rules and small word lists (no tagger, no
model to download), so it runs on every caption of a web-scale build:

* **attribute swap**: two noun phrases carry different attributes of one
  kind (colours, sizes, states, ...): they trade them. "a red cup on a blue
  table" -> "a blue cup on a red table". An article that no longer fits
  ("an red cup") trades places with the other phrase's determiner, or the
  caption is skipped.
* **phrase swap**: two noun phrases around an asymmetric relation (a
  preposition, a spatial phrase, a transitive verb) trade places. "a mug in
  some grass" -> "some grass in a mug"; "a man riding a horse on a beach" ->
  "a horse riding a man on a beach".

Noun phrases are found by scanning out from the relation until a boundary
word (prepositions, conjunctions, auxiliaries, pronouns, relations), a
punctuation mark or a verb-like word; ``X of Y`` stays one phrase unless X
frames the picture ("a photo of"). The first phrase must stand at the start
of a clause (a phrase that is itself the object of a preposition is left
alone). Both rules keep the multiset of (lower-cased) words; only the first
word's capital moves. Captions with no such swap are skipped with a reason
(:data:`SKIP_REASONS`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from pairforge.stages.common.wordlists import (
    ATTRIBUTE_KIND,
    AUXILIARIES,
    BOUNDARY,
    CONJUNCTIONS,
    DETERMINERS,
    ED_NOUNS,
    FRAMING,
    ING_NOUNS,
    KNOWN,
    PRONOUNS,
    RELATIONS,
    SYMMETRIC,
    VERBS,
    WH,
)

#: why a caption got no word-order confounder, in the order they are reported
SKIP_REASONS = (
    "empty", "not_english", "too_long", "no_relation", "symmetric_relation", "no_noun_phrase", "pronoun",
    "identical_phrases", "article_agreement",
)  # fmt: skip
MAX_PHRASE = 6
MIN_KNOWN_SHARE = 0.25

#: (words, relation, symmetric), longest first
_RELATION_TABLE = sorted(
    [(r.split(), r, False) for r in RELATIONS] + [(r.split(), r, True) for r in SYMMETRIC], key=lambda t: -len(t[0])
)
_TOKEN = re.compile(r"^(\W*)(.*?)(\W*)$", re.UNICODE)
_NUMBER = re.compile(r"^\d+([.,:]\d+)*$")
#: a word a phrase may hold: letters, inner hyphens and apostrophes ("t-shirt", "dog's"), no digits
_WORD = re.compile(r"^[^\W\d_]+([-'’][^\W\d_]+)*$", re.UNICODE)


@dataclass(frozen=True)
class Rewrite:
    caption: str
    #: ``attribute`` or ``phrase``
    rule: str


# ------------------------------------------------------------------ tokens


def tokens(caption: str) -> list[tuple[str, str, str]]:
    """Whitespace tokens as (leading punctuation, word, trailing punctuation)."""
    out = []
    for raw in str(caption or "").split():
        lead, core, trail = _TOKEN.match(raw).groups()
        if not core:  # punctuation alone ("-", "&"): all of it trails
            lead, core, trail = "", "", raw
        out.append((lead, core, trail))
    return out


def words(caption: str) -> list[str]:
    """The caption's words, lower-cased, without punctuation."""
    return [c.lower() for _, c, _ in tokens(caption) if c]


def normalize(caption: str) -> str:
    """What two captions must share to count as the same caption."""
    return " ".join(words(caption))


def bag(caption: str) -> str:
    """The sorted multiset of words: a caption and its rewrites share it."""
    return " ".join(sorted(words(caption)))


# ------------------------------------------------------------------ the rules


class _Caption:
    def __init__(self, caption: str):
        self.toks = tokens(caption)
        self.low = [c.lower() for _, c, _ in self.toks]
        self.n = len(self.toks)
        self.rels = self._relations()
        self.in_rel = [None] * self.n
        for k, (s, e, _, _) in enumerate(self.rels):
            for i in range(s, e):
                self.in_rel[i] = k

    def _relations(self) -> list[tuple[int, int, str, bool]]:
        """(start, end, relation, symmetric) spans, left to right, longest first."""
        out, i = [], 0
        while i < self.n:
            for parts, rel, sym in _RELATION_TABLE:
                j = i + len(parts)
                # a relation's words are one phrase: punctuation may only follow its last word
                if self.low[i:j] == parts and all(not self.toks[k][2] for k in range(i, j - 1)):
                    out.append((i, j, rel, sym))
                    i = j
                    break
            else:
                i += 1
        return out

    # token classes
    def punct_after(self, i: int) -> bool:
        return bool(self.toks[i][2])

    def punct_before(self, i: int) -> bool:
        return bool(self.toks[i][0])

    def verbish(self, i: int) -> bool:
        w = self.low[i]
        return (
            w in VERBS
            or (w.endswith("ing") and len(w) > 4 and w not in ING_NOUNS)
            or (w.endswith("ed") and len(w) > 4 and w not in ED_NOUNS and w not in ATTRIBUTE_KIND)
        )

    def boundary(self, i: int) -> bool:
        w = self.low[i]
        return not w or w in BOUNDARY or self.in_rel[i] is not None or not (_WORD.match(w) or _NUMBER.match(w))

    def content(self, i: int) -> bool:
        w = self.low[i]
        return bool(w) and not self.boundary(i) and w not in DETERMINERS and not _NUMBER.match(w)

    def verb_here(self, i: int) -> bool:
        """A verb-like word that does not modify the next word ("covered in",
        not "a painted chair")."""
        if not self.verbish(i):
            return False
        nxt = i + 1
        return self.punct_after(i) or nxt >= self.n or self.boundary(nxt) or self.verbish(nxt)

    # phrases
    def left_phrase(self, s: int) -> tuple[int, int] | str:
        """The noun phrase ending before the relation at ``s`` (skipping
        ``is`` and a verb: "a cat is sitting on"), or a skip reason."""
        j = s - 1
        while j >= 0 and self.low[j] in AUXILIARIES and not self.punct_after(j):
            j -= 1
        if j >= 0 and self.verbish(j) and self.in_rel[j] is None and not self.punct_after(j):
            j -= 1
            while j >= 0 and self.low[j] in AUXILIARIES and not self.punct_after(j):
                j -= 1
        if j < 0 or self.punct_after(j) and j != s - 1:
            return "no_noun_phrase"
        if self.low[j] in PRONOUNS:
            return "pronoun"
        if not self.content(j) or self.verb_here(j):
            return "no_noun_phrase"
        start = j
        while start > 0:
            k = start - 1
            if self.punct_after(k) or self.punct_before(start):
                break
            if self.low[start] in DETERMINERS:  # a determiner opens the phrase, unless "X of the Y"
                if self.low[k] == "of" and k > 0 and self.content(k - 1) and self.low[k - 1] not in FRAMING:
                    start = k - 1
                    continue
                break
            if self.low[k] == "of":
                if k > 0 and self.content(k - 1) and self.low[k - 1] not in FRAMING and not self.punct_after(k - 1):
                    start = k - 1
                    continue
                break
            if self.boundary(k) or self.verb_here(k):
                break
            start = k
        if j - start + 1 > MAX_PHRASE:
            return "no_noun_phrase"
        if start > 0:  # the phrase must open a clause, not be the object of another preposition
            k = start - 1
            opens = (
                self.punct_after(k)
                or self.low[k] in AUXILIARIES | WH | {"there", "here"}
                # "a cat and a dog on", not "a red and blue cup on"
                or (self.low[k] in CONJUNCTIONS and (k == 0 or self.low[k - 1] not in ATTRIBUTE_KIND))
                or (self.low[k] == "of" and (k == 0 or self.low[k - 1] in FRAMING or not self.content(k - 1)))
            )
            if not opens:
                return "no_noun_phrase"
        return start, j + 1

    def right_phrase(self, e: int) -> tuple[int, int] | str:
        """The noun phrase starting after the relation ending at ``e``."""
        if e >= self.n:
            return "no_noun_phrase"
        if self.low[e] in PRONOUNS:
            return "pronoun"
        if self.boundary(e) or self.punct_before(e):
            return "no_noun_phrase"
        end = e  # exclusive end grows
        seen_content = False
        while end < self.n:
            i = end
            if i > e and (self.punct_before(i) or self.punct_after(i - 1)):
                break
            if self.low[i] == "of":
                ok = seen_content and self.low[i - 1] not in FRAMING and i + 1 < self.n and not self.boundary(i + 1)
                if not ok or self.punct_after(i):
                    break
                end += 1
                continue
            if self.boundary(i) or self.verb_here(i):
                break
            if seen_content and self.low[i] in DETERMINERS and self.low[i - 1] != "of":
                break
            seen_content = seen_content or self.content(i)
            end += 1
        last = end - 1
        if end == e or not self.content(last) or self.low[last] in ATTRIBUTE_KIND:
            return "no_noun_phrase"
        if any(self.low[i] in PRONOUNS for i in range(e, end)):
            return "pronoun"
        return (e, end) if end - e <= MAX_PHRASE else "no_noun_phrase"

    # the two rules
    def phrase_swaps(self, reasons: list[str]) -> list[list[int]]:
        perms = []
        for s, e, _rel, sym in self.rels:
            if sym:
                reasons.append("symmetric_relation")
                continue
            left, right = self.left_phrase(s), self.right_phrase(e)
            if isinstance(left, str) or isinstance(right, str):
                reasons.append(left if isinstance(left, str) else right)
                continue
            (a0, a1), (b0, b1) = left, right
            if self.low[a0:a1] == self.low[b0:b1]:
                reasons.append("identical_phrases")
                continue
            order = list(range(self.n))
            perms.append(order[:a0] + order[b0:b1] + order[a1:b0] + order[a0:a1] + order[b1:])
        return perms

    def attribute_swaps(self, reasons: list[str]) -> list[list[int]]:
        found = []  # (position, kind) of attributes that modify a following word
        for i, w in enumerate(self.low):
            kind = ATTRIBUTE_KIND.get(w)
            if kind is None or self.punct_after(i):
                continue
            j = i + 1
            while j < self.n and self.low[j] in ATTRIBUTE_KIND and not self.punct_after(j):
                j += 1
            if j < self.n and self.content(j) and not self.punct_before(j):
                found.append((i, kind))
        perms = []
        for x, (i, kind) in enumerate(found):
            for j, kind2 in found[x + 1 :]:
                if kind2 != kind or self.low[i] == self.low[j]:
                    continue
                between = range(i + 1, j)
                if not any(self.content(k) and self.low[k] not in ATTRIBUTE_KIND for k in between):
                    continue  # one phrase: "a red and blue cup"
                if self._head(i) == self._head(j) and not any(
                    not sym and i < s < j for s, _, _, sym in self.rels
                ):  # "a big dog and a little dog": the same thing said again
                    reasons.append("symmetric_relation")
                    continue
                order = list(range(self.n))
                order[i], order[j] = j, i
                fixed = self._articles(order, i, j)
                if fixed is None:
                    reasons.append("article_agreement")
                    continue
                perms.append(fixed)
                break
            if perms:
                break
        return perms

    def _head(self, i: int) -> str:
        """The word an attribute at ``i`` modifies."""
        j = i + 1
        while j < self.n and self.low[j] in ATTRIBUTE_KIND:
            j += 1
        return self.low[j] if j < self.n else ""

    def _articles(self, order: list[int], i: int, j: int) -> list[int] | None:
        """``order`` with a/an fixed by trading the two determiners, or None."""

        def fits(order) -> bool:
            for p in (i, j):
                art = self.low[order[p - 1]] if p > 0 else ""
                if art in ("a", "an") and (art == "an") != _wants_an(self.low[order[p]]):
                    return False
            return True

        if fits(order):
            return order
        if i > 0 and j > 0 and self.low[i - 1] in DETERMINERS and self.low[j - 1] in DETERMINERS:
            traded = list(order)
            traded[i - 1], traded[j - 1] = order[j - 1], order[i - 1]
            if fits(traded):
                return traded
        return None

    def render(self, order: list[int]) -> str:
        cores = [self.toks[k][1] for k in order]
        first = self.toks[0][1]
        title = first[:1].isupper() and (len(first) == 1 or first[1:].islower())
        sentence_case = sum(c[:1].islower() for c in cores) > len(cores) / 2
        if order[0] != 0 and title and sentence_case:  # the capital only marked the start: it stays there
            cores[order.index(0)] = first.lower()
            if cores[0][:1].islower():
                cores[0] = cores[0][:1].upper() + cores[0][1:]
        return " ".join(lead + core + trail for (lead, _, trail), core in zip(self.toks, cores))


def _wants_an(word: str) -> bool:
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "ute", "uti", "eu", "one", "once")):
        return False
    return w[:1] in "aeio" or w.startswith(("hour", "honest", "honour", "heir")) or w[:1] == "u"


def rewrites(caption: str, max_words: int = 40) -> tuple[list[Rewrite], str]:
    """Every word-order rewrite of ``caption`` (attribute swaps first), and
    the reason there is none (``""`` when there are some)."""
    words_ = words(caption)
    if not words_:
        return [], "empty"
    known = sum(w in KNOWN or bool(_NUMBER.match(w)) for w in words_)
    other_script = any(ch.isalpha() and ord(ch) > 0x24F for ch in str(caption))  # beyond Latin Extended-B
    if other_script or (len(words_) >= 3 and known < MIN_KNOWN_SHARE * len(words_)):
        return [], "not_english"
    if len(words_) > max_words:
        return [], "too_long"
    c = _Caption(caption)
    reasons: list[str] = []
    perms = [(p, "attribute") for p in c.attribute_swaps(reasons)] + [(p, "phrase") for p in c.phrase_swaps(reasons)]
    out, seen = [], {normalize(caption)}
    own = Counter(words_)
    for perm, rule in perms:
        text = c.render(perm)
        key = normalize(text)
        if key in seen:
            continue
        assert Counter(words(text)) == own, (caption, text)  # the invariant: the same words
        seen.add(key)
        out.append(Rewrite(text, rule))
    if out:
        return out, ""
    # the reason of the attempt that got furthest
    return [], max(reasons or ["no_relation"], key=SKIP_REASONS.index)


def rewrite(caption: str, max_words: int = 40) -> tuple[Rewrite | None, str]:
    """The preferred rewrite of ``caption`` and ``""``, or None and why not."""
    found, reason = rewrites(caption, max_words)
    return (found[0], "") if found else (None, reason)
