"""Where a run's files live: a local folder, or a prefix on object storage.

Why this exists: on a cluster every node writes its shards and reads the
rows, fits and decisions that other nodes left under ``OUT/_work``, so OUT
must be something every node sees. A bucket is what clusters have. A
location is a path (``/data/out``, ``file:///data/out``) or a URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``); :func:`path` turns it into
a ``pathlib.Path`` or an :class:`ObjectPath`, which has the part of
``Path``'s interface the writers and readers use (``/``, ``exists``,
``read_bytes``, ``glob``...). Local paths stay ``pathlib.Path`` and every
local write is what it was (a temporary name, then ``os.replace``), so local
runs write the same bytes as before.

Object storage is reached through ``pyarrow.fs`` (``S3FileSystem``,
``GcsFileSystem``): already a dependency, and what Ray Data and pyarrow's
parquet readers take. Options come from the job's ``storage`` section
(:class:`StorageConfig`); credentials never do: each process (the driver,
every Ray worker) finds its own through the SDK's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance
profile; for GCS ``GOOGLE_APPLICATION_CREDENTIALS``), so no secret is
pickled into a task or recorded in a manifest. An :class:`ObjectPath`
pickles as its URI and options; each process builds its filesystem once.

Atomicity on object storage: an object appears only when its upload
completes (a single PUT, or the completion of a multipart upload), and a PUT
over an existing key replaces it whole; readers see the old object or the
new one, never part of one. So an object is written once, to its final key,
from bytes that are complete in memory (:func:`write_atomic`): there is no
temporary key and no copy (on S3 a "rename" is a copy plus a delete, two
requests that are not atomic together). A writer killed mid-upload leaves
no object (an unfinished multipart upload is invisible; a bucket lifecycle
rule aborts it). Which is why :meth:`ObjectPath.open` only reads: a stream
that fails half-way would still publish what it had when closed. S3 and
GCS are strongly consistent: a key read or listed after its PUT returned
is there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow.parquet as pq

#: object-storage schemes (``gcs`` is pyarrow's other spelling of ``gs``)
OBJECT_SCHEMES = ("s3", "gs", "gcs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
#: seconds before a storage request gives up (connecting, then waiting for an answer)
CONNECT_TIMEOUT, REQUEST_TIMEOUT = 10.0, 120.0


@dataclass(frozen=True)
class StorageConfig:
    """The job's ``storage`` section: how to reach its object storage.

    Leave it out for AWS S3 or Google Cloud Storage themselves; set
    ``endpoint_url`` for an S3-compatible server (MinIO, Ceph, R2...)."""

    #: ``http(s)://host[:port]`` of an S3-compatible (or GCS-compatible) server;
    #: default ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` (S3), the provider otherwise
    endpoint_url: str | None = None
    #: the S3 region; default ``$AWS_REGION`` / ``$AWS_DEFAULT_REGION``, else ``us-east-1``
    region: str | None = None
    #: no credentials (public buckets: URL lists published on S3 or GCS)
    anonymous: bool = False

    def __post_init__(self):
        if self.endpoint_url is not None:
            from pairforge.manifests.redact import has_userinfo, redact_text

            u = urlsplit(self.endpoint_url) if isinstance(self.endpoint_url, str) else None
            if u is not None and has_userinfo(self.endpoint_url):  # the message must not repeat the secret
                raise ValueError(
                    f"endpoint_url: a user or password in the URL ({redact_text(self.endpoint_url)!r}) is never sent "
                    "to S3 and would be recorded with the run: give credentials as AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or a profile, an instance role) instead"
                )
            if u is None or u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
                raise ValueError(
                    f"endpoint_url: expected http://HOST[:PORT] or https://HOST[:PORT], got {self.endpoint_url!r}"
                )
        if self.region is not None and not re.fullmatch(r"[a-z0-9-]+", str(self.region)):
            raise ValueError(f"region: expected a region name such as 'us-west-2', got {self.region!r}")


def is_uri(location) -> bool:
    return isinstance(location, str) and _URI.match(location) is not None


def path(location, config: StorageConfig | None = None) -> Path | ObjectPath:
    """``location`` as a ``Path`` (a local path or ``file://``) or an
    :class:`ObjectPath` (``s3://``, ``gs://``; ``config`` or the defaults).
    A ``Path`` or ``ObjectPath`` is returned as it is."""
    if isinstance(location, (Path, ObjectPath)):
        return location
    if not isinstance(location, str):
        return Path(location)
    m = _URI.match(location)
    if m is None:
        return Path(location)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return Path(urlsplit(location).path)
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(f"{location!r}: scheme {scheme!r} is not supported (a path, file://, s3:// or gs://)")
    key = rest.strip("/")
    if not key or key.startswith("."):
        raise ValueError(f"{location!r}: names no bucket ({scheme}://BUCKET/PREFIX)")
    return ObjectPath("gs" if scheme == "gcs" else scheme, re.sub("/+", "/", key), config or StorageConfig())


def is_object(p) -> bool:
    return isinstance(p, ObjectPath)


@functools.cache
def filesystem(scheme: str, config: StorageConfig):
    """This process's pyarrow filesystem for ``scheme`` with ``config`` (built once)."""
    import pyarrow.fs as pafs

    endpoint = config.endpoint_url
    if scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw = {}
        if endpoint:
            u = urlsplit(endpoint)
            kw = {"endpoint_override": u.netloc, "scheme": u.scheme}
        region = config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(
            region=region,
            anonymous=config.anonymous,
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
            **kw,
        )
    kw = {}
    if endpoint:
        u = urlsplit(endpoint)
        kw = {"endpoint_override": u.netloc, "scheme": u.scheme}
    return pafs.GcsFileSystem(anonymous=config.anonymous, request_timeout=REQUEST_TIMEOUT, **kw)


@dataclass(frozen=True)
class ObjectPath:
    """``scheme://bucket/key`` with the storage options to reach it."""

    scheme: str
    key: str  # ``bucket/a/b``: no scheme, no leading or trailing slash
    config: StorageConfig = StorageConfig()

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __fspath__(self):  # pyarrow and open() must never take the URI for a local path
        raise TypeError(f"{self} is on object storage, not a local path")

    def __truediv__(self, other) -> ObjectPath:
        return ObjectPath(self.scheme, f"{self.key}/{str(other).strip('/')}", self.config)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.key < other.key

    @property
    def fs(self):
        return filesystem(self.scheme, self.config)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> ObjectPath:
        up = str(PurePosixPath(self.key).parent)
        return self if up in (".", "") else ObjectPath(self.scheme, up, self.config)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def _type(self):
        return self.fs.get_file_info(self.key).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        """A prefix that holds objects (object storage has no empty folders)."""
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a key's "folders" exist once an object is under them."""

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise ValueError(f"{self}: object storage is opened for reading only; write whole objects (write_atomic)")
        return self.fs.open_input_file(self.key)

    def read_bytes(self) -> bytes:
        try:
            with self.open() as f:
                return f.read()
        except OSError as e:
            if not self.is_file():
                raise FileNotFoundError(f"{self}: no such object") from e
            raise

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One complete object at this key (see the module doc: atomic)."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator[ObjectPath]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.key, recursive=False, allow_not_found=True)
        for info in sorted(self.fs.get_file_info(sel), key=lambda i: i.path):
            yield ObjectPath(self.scheme, info.path, self.config)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects directly under this prefix whose name matches ``pattern``."""
        if "/" in pattern:
            raise ValueError(f"{self}.glob({pattern!r}): one level only")
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))


# ------------------------------------------------------------------ operations


def write_atomic(dest: Path | ObjectPath, data: bytes, fsync: bool = True) -> None:
    """``data`` at ``dest``, whole or not at all. A local file is written to a
    temporary name in its folder (``.NAME.tmp-PID``), then renamed over
    ``dest``; an object is one upload to its final key."""
    if isinstance(dest, ObjectPath):
        dest.write_bytes(data)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, dest)


def write_parquet(dest: Path | ObjectPath, table, **kwargs) -> None:
    """``pq.write_table(table, ...)`` published atomically at ``dest``:
    locally through ``.NAME.tmp-PID`` and a rename, on object storage as
    one upload of the finished file's bytes."""
    if isinstance(dest, ObjectPath):
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        dest.write_bytes(buf.getvalue())
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, dest)


@contextlib.contextmanager
def arrow_input(src: Path | ObjectPath):
    """What pyarrow's readers take for ``src``: the local path itself, or an
    open random-access file on object storage (closed on exit)."""
    if not isinstance(src, ObjectPath):
        yield src
        return
    with src.open() as f:
        yield f


def read_parquet(src: Path | ObjectPath, columns=None):
    if not isinstance(src, ObjectPath):
        return pq.read_table(src, columns=columns)
    return pq.read_table(src.key, columns=columns, filesystem=src.fs)


def read_schema(src: Path | ObjectPath):
    with arrow_input(src) as f:
        return pq.read_schema(f)


def read_metadata(src: Path | ObjectPath):
    with arrow_input(src) as f:
        return pq.read_metadata(f)


def rmtree(root: Path | ObjectPath) -> None:
    """Remove ``root`` and everything under it; nothing there is no error."""
    if not isinstance(root, ObjectPath):
        shutil.rmtree(root, ignore_errors=True)
        return
    if root.exists():  # delete_dir of a missing prefix is an error on S3
        root.fs.delete_dir(root.key)


def walk_files(root: Path | ObjectPath) -> Iterator[Path | ObjectPath]:
    """Every file (object) anywhere under ``root``."""
    if not isinstance(root, ObjectPath):
        for folder, _, files in os.walk(root):
            for f in files:
                yield Path(folder) / f
        return
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(root.key, recursive=True, allow_not_found=True)
    for info in root.fs.get_file_info(sel):
        if info.type == pafs.FileType.File:
            yield ObjectPath(root.scheme, info.path, root.config)


def expand(pattern: str, config: StorageConfig | None = None) -> list[Path | ObjectPath]:
    """The files a path or URI names, with ``*?[`` globs expanded (sorted);
    a name without a wildcard is returned as it is, found or not."""
    import glob

    p = path(pattern, config)
    if not any(ch in pattern for ch in "*?["):
        return [p]
    if not isinstance(p, ObjectPath):
        return [Path(h) for h in sorted(glob.glob(str(p)))]
    parts = p.key.split("/")
    fixed = next(i for i, s in enumerate(parts) if any(ch in s for ch in "*?["))
    if fixed == 0:
        raise ValueError(f"{pattern!r}: the bucket name cannot be a pattern")
    base = ObjectPath(p.scheme, "/".join(parts[:fixed]), p.config)
    want = parts[fixed:]
    hits = []
    for f in walk_files(base):
        rel = f.relative_to(base).parts
        if len(rel) == len(want) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(rel, want)):
            hits.append(f)
    return sorted(hits)


def append_text(dest: Path | ObjectPath, text: str) -> None:
    """Add ``text`` at the end of ``dest`` (an object is rewritten whole: a
    log's few lines, never data)."""
    if not isinstance(dest, ObjectPath):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "a") as f:
            f.write(text)
        return
    try:
        old = dest.read_bytes()
    except FileNotFoundError:
        old = b""
    dest.write_bytes(old + text.encode("utf-8"))
