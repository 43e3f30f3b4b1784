"""MetaCLIP's curation, step 1: which metadata entries each caption holds.

CLIP's 400M pairs were *queried* with 500,000 entries (words, bigrams,
titles, WordNet synsets) rather than filtered by a model; MetaCLIP (Xu et al.,
2023) rebuilt that recipe. This stage finds the entries in each caption
(``stages.common.metadata``: case-insensitive substring, word boundaries an
option, one Aho-Corasick pass per caption) and writes

* ``metadata_entries``: the matched entry ids, sorted (a ragged int32
  column; an id is the entry's position in the entries file), which the
  ``balance`` stage counts and samples by;
* ``num_metadata_entries``: how many there are;

and drops a row that matches none as ``no_metadata_match`` (``drop_unmatched:
false`` keeps it, with no ids). The automaton is built once per worker
process, in :meth:`setup`, and kept for every later batch and stage copy.
The entries file is read on the driver when the stage is built (a missing or
malformed file is one line naming ``entries``, before Ray starts) and its
SHA-256 travels with the stage, so a node holding another file at that path
fails loudly instead of matching a different list.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, Column, Resources, Stage, batch_len, object_array, reject
from pairforge.stages.common import metadata as md
from pairforge.stages.options import options

ENTRIES_COLUMN = "metadata_entries"
#: ``scheme://...``: an object-storage location (stages never import ``manifests``' storage)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
COUNT_COLUMN = "num_metadata_entries"


@options
class Config:
    #: the entries file (one entry per line, or MetaCLIP's metadata.json list);
    #: ``wordnet``: the WordNet list ``make setup`` installs (scripts/build_wordnet_entries.py)
    entries: str = md.WORDNET
    #: a match must stand as a word (see ``stages.common.metadata``); default: any substring (issue 25's rule)
    word_boundaries: bool = False
    #: drop rows that match no entry (``no_metadata_match``); false: keep them with no ids
    drop_unmatched: bool = True
    #: rows per ``process_batch`` call
    batch_size: int = 4096

    def __post_init__(self):
        if not isinstance(self.entries, str) or not self.entries.strip():
            raise ValueError(f"entries: expected a file path or {md.WORDNET!r}, got {self.entries!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size!r}")


class MetadataMatchStage(Stage):
    name: ClassVar[str] = "metadata_match"
    Config = Config
    # built, it reads its entries file (WordNet's, if ``make setup`` installed it)
    declares_columns: ClassVar[tuple[str, ...]] = (ENTRIES_COLUMN, COUNT_COLUMN)

    def __init__(self, config: Config):
        super().__init__(config)
        self.path = _entries_file(config.entries)
        try:
            entries, self.sha256 = md.read_entries(self.path)
        except ValueError as e:
            raise ValueError(f"entries: {e}") from None
        except OSError as e:
            raise ValueError(f"entries: cannot read {str(self.path)!r}: {e.strerror or e}") from None
        if not len(entries):
            raise ValueError(f"entries: {str(self.path)!r} holds no entry")
        self.entry_count = entries.size
        self._matcher: md.Matcher | None = None

    def __getstate__(self):  # ship the path and digest, never the automaton
        state = dict(self.__dict__)
        state["_matcher"] = None
        return state

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.config.batch_size)

    def outputs(self) -> tuple[Column, ...]:
        return (
            Column(ENTRIES_COLUMN, "ragged", "int32", (), in_tar=False),
            Column(COUNT_COLUMN, "scalar", "int32", default=-1),
        )

    def setup(self) -> None:
        if self._matcher is None:
            self._matcher = md.matcher(self.path, self.config.word_boundaries, self.sha256)

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        n = batch_len(batch)
        found = self._matcher.match_many(batch.get("caption", [None] * n))
        out = dict(batch)
        out[ENTRIES_COLUMN] = object_array(found)
        counts = np.fromiter((len(ids) for ids in found), dtype=np.int32, count=n)
        out[COUNT_COLUMN] = counts
        if self.config.drop_unmatched:
            detail = {"entries": self.entry_count, "word_boundaries": self.config.word_boundaries}
            reject(out, counts == 0, self.name, "no_metadata_match", detail)
        return out


def _entries_file(entries: str):
    """The local file ``entries`` names, or a ``ValueError`` naming the key."""
    if _URI.match(entries) and not entries.startswith("file://"):
        raise ValueError(f"entries: {entries!r}: an entries file on object storage is not read yet; give a local copy")
    path = md.resolve(entries[len("file://") :] if entries.startswith("file://") else entries)
    if entries == md.WORDNET and not path.is_file():
        raise ValueError(
            f"entries: the WordNet default is not installed ({path}); run `make setup` "
            "(or scripts/build_wordnet_entries.py), or give entries: /path/to/entries.txt"
        )
    if not path.is_file():
        raise ValueError(f"entries: no file {str(path)!r}")
    return path
