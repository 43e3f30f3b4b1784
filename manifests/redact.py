"""Secrets out of what a run records: the manifest, ``_work/job.json``, the
log lines, the error messages.

Why this exists: a job file is copied into ``manifest.json`` (so a run says
how it was made), and a job may name URLs that carry a secret: an
``endpoint_url`` with ``user:pass@`` was written to the manifest as it was,
and manifests are shared with the dataset. Here a URL's user information
(``scheme://user:pass@host`` -> ``scheme://***@host``) and the values of
query parameters that hold credentials (``X-Amz-Signature``, ``token``,
``access_token``...) become ``***`` in any string, wherever it sits in a
nested record.

What this does not touch: the rows. A URL list's URLs are the dataset's
data and are written as given (``url`` column, rejects); see
docs/security.md.
"""

from __future__ import annotations

import re

MASK = "***"
#: ``scheme://user[:password]@``: everything between ``//`` and the first ``@``
#: of the authority (no ``/``, ``?``, ``#`` or space in between)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]+@")
#: query parameters whose value is a credential (presigned URLs, API tokens)
_SECRET_PARAMS = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|signature|sig|token|access_token|id_token|api_key|apikey|password|passwd|secret|client_secret)=)[^&#\s]*"
)


def redact_text(text: str) -> str:
    """``text`` with URL credentials masked (see the module doc)."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_PARAMS.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text))


def redact(value):
    """``value`` (JSON-like: dicts, lists, tuples, strings) with every string
    through :func:`redact_text`; keys too. A new value; the input is unchanged."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def has_userinfo(url: str) -> bool:
    return isinstance(url, str) and _USERINFO.search(url) is not None
