"""Check a whole job on the driver before anything starts.

Why this exists: a job that cannot work used to fail only inside a Ray actor,
minutes in. A model name with a typo or a pretrained tag on a machine without a
network ended after ~100 s of Hugging Face retries in ~180 lines of Ray
traceback; ``dedup_semantic`` without ``clip_score`` ended as
``KeyError: 'img_emb'`` deep in Ray. Here every such mistake is one line that
names the key and its value, before Ray starts and before anything is written
(``pairforge run`` exits 2).

What is checked (types and ranges of every field are the job loader's and the
stage configs' own checks, ``pipeline.config``):

* each stage can be built from its options (checks in the stage's constructor);
* the URL lists exist and have the URL and caption columns (every source's,
  after its ``columns`` map: each column it names is in the file);
* an open_clip stage's ``model`` is an open_clip architecture (close names are
  suggested) and its ``pretrained`` a file, ``random`` or a tag of that model
  whose weights are in the local cache; a tag that is not cached on a machine
  with no network is an error saying how to give a local checkpoint;
* every column a stage reads (``Stage.inputs()``) is in the URL list or
  declared (``Stage.outputs()``) by an earlier stage; else the error names the
  stage, the column and the stage that would make it;
* an output on object storage (``s3://``, ``gs://``; ``manifests.storage``):
  its bucket answers at the job's ``storage`` endpoint.

Nothing here imports Ray or torch or loads weights, and no network request
is made but to the job's own object storage (the output's bucket, the input
files' schemas) when it uses one. open_clip's registries are read from its own files (its model configs, and its
``pretrained.py`` loaded without the package, which would import torch), the
weights are looked up in the Hugging Face and open_clip caches, and "no
network" is ``HF_HUB_OFFLINE`` or no route to a public address (a UDP
``connect`` asks the kernel's routing table; it sends nothing).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import socket
import sys
import types
from pathlib import Path

from manifests import storage
from manifests.storage import StorageConfig
from pipeline.config import ConfigError, JobConfig, field_error, input_entries
from stages.base import IDENTITY_COLUMNS, Stage

#: stages whose ``model`` / ``pretrained`` options name open_clip weights
OPEN_CLIP_STAGES = ("clip_score",)
#: built-in stages that cannot be built from defaults alone (cheaply), and what they declare
KNOWN_PRODUCERS = {"clip_score": "clip_score", "img_emb": "clip_score", "text_emb": "clip_score"}
#: input files whose columns are read here; the reader checks the others as it streams them
MAX_SCHEMA_FILES = 200
#: public addresses for the route check (Cloudflare's resolver; nothing is sent to it)
ROUTE_PROBES = ((socket.AF_INET, ("1.1.1.1", 53)), (socket.AF_INET6, ("2606:4700:4700::1111", 53)))


def check_job(job: JobConfig) -> list[str]:
    """Every problem of ``job`` in one :class:`ConfigError` (a line each);
    returns the warnings (one line each) when there is none."""
    problems: list[str] = []
    warnings: list[str] = []
    stages = _build_stages(job, problems)
    columns = input_columns(job, problems)
    bad = set()
    for where, st in stages:
        if st is None:
            continue
        if st.name in OPEN_CLIP_STAGES and hasattr(st.config, "model"):
            before = len(problems)
            check_open_clip(where, st.config, problems, warnings)
            if len(problems) > before:
                bad.add(where)
        prior = getattr(st.config, "prior_build", None)
        if prior and storage.is_uri(prior) and not str(prior).startswith("file://"):
            problems.append(
                f"{where}.prior_build: {prior!r}: an earlier build on object storage is not read yet; give a local copy of its shards/*.parquet"
            )
        elif prior and not any((Path(prior) / "shards").glob("*.parquet")):
            problems.append(f"{where}.prior_build: {prior!r} holds no shards/*.parquet (not the OUT of an earlier run)")
    if columns is not None:  # a stage with a problem declares nothing: the stages after it are not judged on it
        problems += check_columns([(w, None if w in bad else s) for w, s in stages], columns)
    if job.ray.num_cpus is not None and job.ray.num_cpus < 1:
        problems.append(f"job.ray.num_cpus: expected >= 1 (or null: all of this machine's), got {job.ray.num_cpus!r}")
    problems += _check_output(job.output.dir, job.storage)
    if problems:
        raise ConfigError("\n".join(problems))
    return warnings


def _build_stages(job: JobConfig, problems: list[str]) -> list[tuple[str, Stage | None]]:
    from pipeline.registry import stage_class

    out: list[tuple[str, Stage | None]] = []
    for i, spec in enumerate(job.stages):
        where = f"stages[{i}]({spec.name})"
        try:
            out.append((where, stage_class(spec.name)(spec.config)))
        except (ValueError, TypeError) as e:  # the stage's own checks of its options
            problems.append(str(field_error(where, e, [f.name for f in dataclasses.fields(spec.config)])))
            out.append((where, None))
    return out


def _check_output(out_dir: str, config: StorageConfig) -> list[str]:
    if storage.is_uri(out_dir):
        try:
            root = storage.path(out_dir, config)
        except ValueError as e:
            return [f"job.output.dir: {e}"]
        if storage.is_object(root):
            return _check_bucket(root)
        out_dir = str(root)
    p = Path(out_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return [f"job.output.dir: {out_dir!r} is inside {str(p)!r}, which is not a folder"]
    if not os.access(p, os.W_OK | os.X_OK):
        return [f"job.output.dir: {out_dir!r} cannot be written ({str(p)!r} is not writable)"]
    return []


def _check_bucket(root) -> list[str]:
    """The output's bucket answers: one request to the job's own storage
    (the only one made here), so that a wrong endpoint, bucket or missing
    credentials is a line now rather than a failed task later."""
    bucket = root.key.split("/", 1)[0]
    where = f"job.output.dir: {str(root)!r}"
    endpoint = root.config.endpoint_url or "the provider's endpoint"
    try:
        found = storage.ObjectPath(root.scheme, bucket, root.config).is_dir()
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{where}: cannot reach bucket {bucket!r} at {endpoint} (job.storage): {first}"]
    if not found:
        return [f"{where}: bucket {bucket!r} does not exist at {endpoint} (job.storage)"]
    return []


# ------------------------------------------------------------------ columns


def input_columns(job: JobConfig, problems: list[str]) -> set[str] | None:
    """The columns every row has after the reader (``url``, ``caption``,
    ``source``, the identity columns and the URL lists' own, renamed as the
    reader renames them), from the files' schemas, common to every source;
    ``None`` when the input itself is wrong (then that is the problem reported)."""
    from pipeline.reader import carried_names, detect_format, expand_paths, renamed_names

    common: set[str] | None = None
    for where, cfg in input_entries(job.input):
        try:
            paths = expand_paths(cfg.paths, where, job.storage)
        except ConfigError as e:
            problems.append(str(e))
            return None
        for path in paths[:MAX_SCHEMA_FILES]:
            try:
                fmt = detect_format(path, cfg.format, where)
                names = renamed_names(_schema_names(path, fmt), cfg, path, where)
            except ConfigError as e:
                problems.append(str(e))
                return None
            except Exception as e:  # noqa: BLE001 - an unreadable file is a job error
                problems.append(f"{where}.paths: cannot read {str(path)!r} as {cfg.format}: {type(e).__name__}: {e}")
                return None
            for role, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
                if col not in names:
                    problems.append(
                        f"{where}.{role}: {col!r} is not a column of {str(path)!r} (columns: {', '.join(names)})"
                    )
            cols = {"url", "caption", "source", *IDENTITY_COLUMNS, *carried_names(names, cfg).values()}
            common = cols if common is None else common & cols
    return common


def _schema_names(path, fmt: str) -> list[str]:
    """Column names from a file's footer or first block, not its rows."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    if fmt == "parquet":
        return storage.read_schema(path).names
    if fmt == "coco":  # one JSON object: its rows' columns are the reader's; the reader checks the rest
        from pipeline.reader import COCO_COLUMNS

        with path.open("rb") as f:
            if f.read(4096).lstrip()[:1] != b"{":
                raise ValueError("not COCO captions JSON (an object with 'images' and 'annotations')")
        return list(COCO_COLUMNS)
    if fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        with storage.arrow_input(path) as src, pacsv.open_csv(src, parse_options=opts) as reader:
            return reader.schema.names
    with path.open("rb") as f:
        head = f.read(1 << 20)
    head = head[: head.rfind(b"\n") + 1] or head
    return pajson.read_json(io.BytesIO(head)).schema.names if head.strip() else []


def check_columns(stages: list[tuple[str, Stage | None]], available: set[str]) -> list[str]:
    """Every column a stage reads must be in the URL list or declared by an
    earlier stage (the stages' ``inputs()`` against their ``outputs()``).
    ``None`` for a stage that could not be built: what it would declare is
    unknown, so the stages after it are not judged."""
    have = set(available)
    problems = []
    declared, reads = [], {}
    for where, st in stages:
        if st is None:
            break
        try:  # a stage of one's own may fail here; say which
            declared.append((where, st, {c.name for c in st.outputs()}))
            reads[where] = tuple(dict.fromkeys(st.inputs()))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: its declared columns cannot be read: {type(e).__name__}: {e}")
            break
    for i, (where, st, own) in enumerate(declared):
        if where not in reads:
            break
        for col in reads[where]:
            if col in have or col in own:
                continue
            later = [st2.name for _, st2, cols in declared[i + 1 :] if col in cols]
            if later:
                hint = f"{later[0]} declares it but runs after {st.name}: put {st.name} after {later[0]}"
            else:
                maker = producers().get(col)
                hint = f"add a {maker!r} stage before it" if maker else "no stage declares it; add it to the URL list"
            problems.append(
                f"{where}: reads column {col!r}, which neither the URL list nor an earlier stage provides ({hint})"
            )
        have |= own
    return problems


@functools.lru_cache(maxsize=1)
def producers() -> dict[str, str]:
    """Column -> the built-in stage that declares it (stages that build from
    their defaults, plus :data:`KNOWN_PRODUCERS`)."""
    from pipeline.config import build
    from pipeline.registry import STAGES, stage_class

    out = dict(KNOWN_PRODUCERS)
    for name in STAGES:
        if name in KNOWN_PRODUCERS.values():
            continue
        try:
            cls = stage_class(name)
            st = cls(build(cls.Config, {}, name))
            for c in st.outputs():
                out.setdefault(c.name, name)
        except (ConfigError, ValueError, TypeError):
            continue
    return out


# ------------------------------------------------------------------ open_clip


def check_open_clip(where: str, cfg, problems: list[str], warnings: list[str]) -> None:
    """``cfg.model`` and ``cfg.pretrained`` against open_clip's registries and
    the local caches, as ``stages.common.clip.load`` will resolve them."""
    model, pretrained = cfg.model, getattr(cfg, "pretrained", None)
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            problems.append(f"{where}.model: {model!r}: no open_clip_config.json in {str(folder.resolve())!r}")
        return
    if model.startswith("hf-hub:"):
        _check_hub_model(where, model, problems, warnings)
        return
    names = open_clip_models()
    if model not in names:
        problems.append(f"{where}.model: {model!r} is not an open_clip model{_did_you_mean(model, names)}")
        return
    if pretrained is None or pretrained == "random":
        if pretrained == "random":
            warnings.append(f"{where}.pretrained: 'random' weights: scores mean nothing (benchmarks only)")
        return
    if os.path.isfile(pretrained):
        return
    reg = pretrained_registry()
    tag_cfg = reg.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if _looks_like_path(pretrained):
            problems.append(
                f"{where}.pretrained: no file {pretrained!r} (from {os.getcwd()!r}: {os.path.abspath(pretrained)!r})"
            )
            return
        tags = reg.list_pretrained_tags_by_model(model)
        known = (
            f"its tags: {', '.join(tags)}" if tags else f"open_clip has no weights for {model}: give a checkpoint file"
        )
        problems.append(
            f"{where}.pretrained: {pretrained!r} is neither a file nor an open_clip tag of {model!r} "
            f"({known}){_did_you_mean(pretrained, tags)}"
        )
        return
    if cached_weights(reg, tag_cfg) is not None:
        return
    source = _weights_source(reg, tag_cfg)
    offline = offline_reason()
    if offline:
        problems.append(
            f"{where}.pretrained: the weights of {model} {pretrained!r} are not on this machine and there is no "
            f"network ({offline}): fetch {source} where there is one and give the file, pretrained: /path/to/weights"
        )
    else:
        warnings.append(
            f"{where}.pretrained: {model} {pretrained!r} is not in the local cache; each worker downloads it from "
            f"{source} (with no network, give a local file: pretrained: /path/to/weights; HF_HUB_OFFLINE=1 fails here)"
        )


def _check_hub_model(where: str, model: str, problems: list[str], warnings: list[str]) -> None:
    repo = model[len("hf-hub:") :]
    if _hub_cached(repo, "open_clip_config.json"):
        return
    offline = offline_reason()
    line = f"{where}.model: {model!r} is not in the Hugging Face cache"
    if offline:
        problems.append(f"{line} and there is no network ({offline}): download it elsewhere and use local-dir:/path")
    else:
        warnings.append(f"{line}; each worker downloads it from https://huggingface.co/{repo}")


def _did_you_mean(value: str, names) -> str:
    names = list(names)
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(value.lower(), list(lower), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(lower[c]) for c in close)}?)" if close else ""


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith(("~", "."))
        or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    )


def _weights_source(reg, tag_cfg: dict) -> str:
    """Where open_clip would download a tag's weights from (the file it prefers)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return tag_cfg.get("url") or "its source"
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    alternatives = list(getattr(reg, "_get_safe_alternatives", lambda _: ())(filename))
    names = " or ".join([*alternatives, filename])
    return f"{names} from https://huggingface.co/{repo}"


def offline_reason() -> str | None:
    """Why there is no network for a download, or ``None`` when there may be
    one. Sends nothing: ``HF_HUB_OFFLINE``, then whether the kernel has a
    route to a public address (``connect`` on a UDP socket only picks a route)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    for family, addr in ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
            return None
        except OSError:
            continue
    return "no route to the internet"


def cached_weights(reg, tag_cfg: dict) -> str | None:
    """The local file open_clip's ``download_pretrained`` would use for a tag,
    if it is already there (Hugging Face cache, or open_clip's ``~/.cache/clip``)."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        alternatives = getattr(reg, "_get_safe_alternatives", lambda _: ())
        for name in (*alternatives(filename), filename):
            hit = _hub_cached(repo, name)
            if hit:
                return hit
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _hub_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - a malformed repo id is "not cached"; the name check reports it
        return None
    return hit if isinstance(hit, str) else None


# ------------------------------------------------------------------ open_clip's registries, without torch


def _open_clip_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    locations = spec.submodule_search_locations if spec else None
    return Path(next(iter(locations))) if locations else None


@functools.lru_cache(maxsize=1)
def open_clip_models() -> tuple[str, ...]:
    """``open_clip.list_models()`` plus the project's configs (``pf-tiny``):
    the model config files open_clip scans, read without importing it (its
    import costs seconds: torch, timm)."""
    from stages.common.clip import MODEL_CONFIG_DIR

    if "open_clip" in sys.modules:
        import open_clip

        from stages.common.clip import register_model_configs

        register_model_configs()
        return tuple(open_clip.list_models())
    names = []
    base = _open_clip_dir()
    for folder in (base / "model_configs" if base else None, MODEL_CONFIG_DIR):
        for f in sorted(folder.glob("*.json")) if folder else ():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):  # what open_clip's scan keeps
                names.append(f.stem)
    # open_clip's own order (``factory._natural_key``): digits compare as numbers
    return tuple(
        sorted(
            dict.fromkeys(names), key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]
        )
    )


_REGISTRY_PACKAGE = "_pairforge_open_clip_registry"


@functools.lru_cache(maxsize=1)
def pretrained_registry() -> types.ModuleType:
    """open_clip's ``pretrained`` module (``get_pretrained_cfg``,
    ``list_pretrained_tags_by_model``). Importing it through ``open_clip``
    imports the whole package (torch, timm: seconds), so unless open_clip is
    loaded already, its file is loaded as a module of a private package
    over open_clip's folder (it needs only ``constants`` and ``version``
    there), with ``safetensors.torch`` (which imports torch; the registry
    does not use it) hidden while it loads."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.pretrained")
    base = _open_clip_dir()
    if base is None:
        return importlib.import_module("open_clip.pretrained")  # raises the ImportError a user should see
    pkg = types.ModuleType(_REGISTRY_PACKAGE)
    pkg.__path__ = [str(base)]
    sys.modules[_REGISTRY_PACKAGE] = pkg
    hide = "safetensors.torch" not in sys.modules
    if hide:
        sys.modules["safetensors.torch"] = None  # type: ignore[assignment]  # makes its import an ImportError
    try:
        return importlib.import_module(f"{_REGISTRY_PACKAGE}.pretrained")
    except Exception:  # noqa: BLE001 - open_clip changed: pay for the real import
        return importlib.import_module("open_clip.pretrained")
    finally:
        if hide:
            sys.modules.pop("safetensors.torch", None)
