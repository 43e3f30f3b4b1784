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
* each stage's own ``check()``: the model files and packages it needs are
  on this machine (a missing one is a line naming the option), and what it
  reads fits what the stages before it declare (an embedding head's width);
* every column a stage reads (``Stage.inputs()``) is in the URL list or
  declared (``Stage.outputs()``) by an earlier stage; else the error names the
  stage, the column and the stage that would make it;
* an output on object storage (``s3://``, ``gs://``; ``manifests.storage``):
  its bucket answers at the job's ``storage`` endpoint.

Nothing here imports Ray or torch or loads weights, and no network request
is made but to the job's own object storage (the output's bucket, the input
files' schemas) when it uses one, and, for weights that are not cached, a
DNS lookup of the hub and a TCP connect to it (nothing sent), each bounded
by a few seconds; ``--address``: a TCP connect to that cluster's port. The column checks are
:mod:`pipeline.checks_columns`; what open_clip has on this machine (its
registries, its cached weights, whether there is a network), found without
importing torch and without sending anything, is
:mod:`pipeline.open_clip_local`. Their public names are importable from
here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import threading
from pathlib import Path

from pairforge.manifests import storage
from pairforge.manifests.storage import StorageConfig

# the names of the column and open_clip modules are re-exported: callers import them from here
from pairforge.pipeline.checks_columns import MAX_SCHEMA_FILES, check_columns, input_columns, producers  # noqa: F401
from pairforge.pipeline.config import ConfigError, JobConfig, field_error
from pairforge.pipeline.open_clip_local import (  # noqa: F401
    ROUTE_PROBES,
    _hub_cached,
    _weights_source,
    cached_weights,
    offline_reason,
    open_clip_models,
    pretrained_registry,
)
from pairforge.pipeline.stagelist import CustomOptions
from pairforge.stages.base import Stage
from pairforge.stages.common.assets import resolve as resolve_asset


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
        if st.open_clip_options:  # the stage names open_clip weights (Stage.open_clip_options)
            before = len(problems)
            check_open_clip(where, st.config, problems, warnings, st.open_clip_options)
            if len(problems) > before:
                bad.add(where)
    if job.ray.num_cpus is not None and job.ray.num_cpus < 1:
        problems.append(f"ray.num_cpus: expected >= 1 (or null: all of this machine's), got {job.ray.num_cpus!r}")
    problems += _check_output(job.output.dir, job.storage)
    stages = _custom_stages(job, stages, problems)
    # a stage with a problem declares nothing: the stages after it are not judged on it
    judged = [(w, None if w in bad else s) for w, s in stages]
    problems += check_stages(judged)
    if columns is not None:
        problems += check_columns(judged, columns)
    if problems:
        raise ConfigError("\n".join(problems))
    return warnings


def check_stages(stages: list[tuple[str, Stage | None]]) -> list[str]:
    """Each stage's own :meth:`~stages.base.Stage.check` (its models and
    packages are on this machine, its inputs fit), given the columns the
    stages before it declare; a stage that could not be built stops the walk."""
    problems: list[str] = []
    declared: dict = {}
    for where, st in stages:
        if st is None:
            break
        try:
            problems += [f"{where}.{line}" for line in st.check(dict(declared))]
            declared.update({c.name: c for c in st.outputs()})
        except Exception as e:  # noqa: BLE001 - a stage of one's own may fail here; say which
            problems.append(f"{where}: its check failed: {type(e).__name__}: {e}")
            break
    return problems


def _custom_stages(job: JobConfig, stages: list, problems: list[str]) -> list:
    """The custom stages (``module:Class``) built, their modules imported
    now that the rest of the job is right (``config.resolve_stages``); with
    any problem so far, none is imported and each stays unjudged."""
    from pairforge.pipeline.config import resolve_stages

    pending = [i for i, spec in enumerate(job.stages) if isinstance(spec.config, CustomOptions)]
    if not pending or problems:
        return stages
    try:
        resolved = resolve_stages(job)
    except ConfigError as e:
        problems.append(str(e))
        return stages
    out = list(stages)
    for i in pending:
        out[i] = _build_one(i, resolved.stages[i], problems)
    return out


def _build_stages(job: JobConfig, problems: list[str]) -> list[tuple[str, Stage | None]]:
    """Each stage built from its options; a custom stage not yet imported is ``None``."""
    return [_build_one(i, spec, problems) for i, spec in enumerate(job.stages)]


def _build_one(i: int, spec, problems: list[str]) -> tuple[str, Stage | None]:
    from pairforge.stages import stage_class

    where = f"stages[{i}]({spec.name})"
    if isinstance(spec.config, CustomOptions):
        return where, None
    try:
        return where, stage_class(spec.name)(spec.config)
    except (ValueError, TypeError) as e:  # the stage's own checks of its options
        problems.append(str(field_error(where, e, [f.name for f in dataclasses.fields(spec.config)])))
        return where, None


#: seconds to wait for a Ray cluster's port to answer before saying it does not
RAY_CONNECT_TIMEOUT = 10.0
#: the ports a Ray address without one means: the GCS, and Ray Client's for ``ray://``
RAY_DEFAULT_PORTS = {"": 6379, "ray://": 10001}


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> str | None:
    """Why the Ray cluster at ``address`` cannot be joined, or ``None`` when
    its port answers (or when Ray finds the cluster itself: ``auto``, ``local``).

    ``ray.init(address=...)`` on a port where nothing listens retries for
    minutes with GCS warnings; a TCP connect (the host name looked up once)
    answers in seconds, bounded by ``timeout`` as a whole."""
    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return None
    scheme = "ray://" if address.startswith("ray://") else ""
    rest = address[len(scheme) :].split("/", 1)[0]
    host, sep, port = rest.rpartition(":") if not rest.endswith("]") else (rest, "", "")
    if not sep:
        host, port = rest, str(RAY_DEFAULT_PORTS[scheme])
    host = host.strip("[]")
    if not host or not port.isdigit():
        return f"--address {address!r}: expected host:port (or ray://host:port, auto)"
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(e.strerror or type(e).__name__)

    t = threading.Thread(target=probe, daemon=True, name="pairforge-ray-probe")
    t.start()
    t.join(timeout + 1.0)  # a host name whose lookup hangs counts against the same budget
    why = result[0] if result else f"no answer in {timeout:.0f}s"
    if result and result[0] is None:
        return None
    return (
        f"--address {address!r}: no Ray cluster answers at {host}:{port} ({why}). Start one there "
        "(ray start --head --port PORT), give the address `ray status` prints, or leave --address, "
        "ray.address and $RAY_ADDRESS unset for a local Ray"
    )


def _check_output(out_dir: str, config: StorageConfig) -> list[str]:
    if storage.is_uri(out_dir):
        try:
            root = storage.path(out_dir, config)
        except ValueError as e:
            return [f"output.dir: {e}"]
        if storage.is_object(root):
            return _check_bucket(root)
        out_dir = str(root)
    p = Path(out_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return [f"output.dir: {out_dir!r} is inside {str(p)!r}, which is not a folder"]
    if not os.access(p, os.W_OK | os.X_OK):
        return [f"output.dir: {out_dir!r} cannot be written ({str(p)!r} is not writable)"]
    return []


def _check_bucket(root) -> list[str]:
    """The output's bucket answers: one request to the job's own storage
    (the only one made here), so that a wrong endpoint, bucket or missing
    credentials is a line now rather than a failed task later."""
    bucket = root.key.split("/", 1)[0]
    where = f"output.dir: {str(root)!r}"
    endpoint = root.config.endpoint_url or "the provider's endpoint"
    try:
        found = storage.ObjectPath(root.scheme, bucket, root.config).is_dir()
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{where}: cannot reach bucket {bucket!r} at {endpoint} (storage): {first}"]
    if not found:
        return [f"{where}: bucket {bucket!r} does not exist at {endpoint} (storage)"]
    return []


# ------------------------------------------------------------------ open_clip


def check_open_clip(
    where: str, cfg, problems: list[str], warnings: list[str], options: tuple[str, str] = ("model", "pretrained")
) -> None:
    """The ``cfg`` options ``options`` names, an open_clip model and its
    weights (a stage's ``open_clip_options``), against open_clip's
    registries and the local caches, as ``stages.common.clip.load`` will
    resolve them; each line names the option."""
    model_key, weights_key = options
    model, pretrained = getattr(cfg, model_key), getattr(cfg, weights_key, None)
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            problems.append(f"{where}.{model_key}: {model!r}: no open_clip_config.json in {str(folder.resolve())!r}")
        return
    if model.startswith("hf-hub:"):
        _check_hub_model(f"{where}.{model_key}", model, problems, warnings)
        return
    names = open_clip_models()
    if model not in names:
        problems.append(f"{where}.{model_key}: {model!r} is not an open_clip model{_did_you_mean(model, names)}")
        return
    where = f"{where}.{weights_key}"
    if pretrained is None or pretrained == "random":
        if pretrained == "random":
            warnings.append(f"{where}: 'random' weights: scores mean nothing (benchmarks only)")
        return
    if os.path.isfile(resolve_asset(pretrained)):  # a file, or a shipped asset's short name (pf-tiny-scorer)
        return
    reg = pretrained_registry()
    tag_cfg = reg.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if _looks_like_path(pretrained):
            problems.append(f"{where}: no file {pretrained!r} (from {os.getcwd()!r}: {os.path.abspath(pretrained)!r})")
            return
        tags = reg.list_pretrained_tags_by_model(model)
        known = (
            f"its tags: {', '.join(tags)}" if tags else f"open_clip has no weights for {model}: give a checkpoint file"
        )
        problems.append(
            f"{where}: {pretrained!r} is neither a file nor an open_clip tag of {model!r} "
            f"({known}){_did_you_mean(pretrained, tags)}"
        )
        return
    if cached_weights(reg, tag_cfg) is not None:
        return
    source = _weights_source(reg, tag_cfg)
    offline = offline_reason()
    if offline:
        problems.append(
            f"{where}: {pretrained!r}: the weights of {model} are not on this machine and cannot be "
            f"downloaded ({offline}): fetch {source} where there is a network and give the file "
            f"(pretrained: /path/to/weights), or use the shipped model (model: pf-tiny, pretrained: pf-tiny-scorer)"
        )
    else:
        warnings.append(
            f"{where}: {model} {pretrained!r} is not in the local cache; each worker downloads it from "
            f"{source} (with no network, give a local file: pretrained: /path/to/weights; HF_HUB_OFFLINE=1 fails here)"
        )


def _check_hub_model(where: str, model: str, problems: list[str], warnings: list[str]) -> None:
    repo = model[len("hf-hub:") :]
    if _hub_cached(repo, "open_clip_config.json"):
        return
    offline = offline_reason()
    line = f"{where}: {model!r} is not in the Hugging Face cache"
    if offline:
        problems.append(f"{line} and cannot be downloaded ({offline}): download it elsewhere and use local-dir:/path")
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
