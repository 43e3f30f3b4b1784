"""ray_cluster.yaml is a config `ray up` accepts: checked against Ray's own
schema (ray/autoscaler/ray-schema.json) through Ray's own loader; its images
and pins are the project's (the Ray installed here, the Makefile's Python and
torch), and every `ray` command its header shows parses with Ray's own CLI."""

import copy
import re
import shlex
from importlib import metadata
from pathlib import Path

import click
import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ray_cluster.yaml"


def _load():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_passes_rays_schema():
    cfg = prepare_config(_load())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(types)
    assert any("pip install" in c and "-e /home/ray/pairforge" in c for c in cfg["setup_commands"]), (
        "the project must be installed on every node"
    )


def test_a_broken_config_is_refused_by_the_same_check():
    bad = copy.deepcopy(_load())
    bad["available_node_types"]["gpu_worker"]["max_workerz"] = 3
    with pytest.raises(ValidationError, match="max_workerz"):
        validate_config(prepare_config(bad))


def test_images_and_pins_are_the_projects():
    cfg = _load()
    make = (ROOT / "Makefile").read_text()
    assert "python3.11" in make  # the venv's Python, as the images'
    ray_version = metadata.version("ray")
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-cpu"
    assert (
        cfg["available_node_types"]["gpu_worker"]["docker"]["worker_image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    )
    torch_pin = re.search(r"torch==\S+ torchvision==\S+", make).group(0)
    setup = " ".join(cfg["setup_commands"])
    assert torch_pin in setup and f'"ray[data]=={ray_version}"' in setup
    assert setup.index(torch_pin) < setup.index("-e /home/ray/pairforge"), "pins before the project"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all(c.startswith("ulimit -n 65536;") for c in start), key
    assert "--ulimit nofile=65536:65536" in cfg["docker"]["run_options"]


def _header_commands() -> list[list[str]]:
    lines = []
    for line in CONFIG.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("ray "):
            lines.append(shlex.split(text.split("   #")[0]))
    return lines


def test_the_header_shows_the_launch_in_order_and_each_command_parses():
    from ray.scripts.scripts import cli

    commands = _header_commands()
    verbs = [c[1] for c in commands]
    assert verbs[:2] == ["get-auth-token", "up"] and "exec" in verbs and "down" in verbs and verbs.index("down") > verbs.index("exec")
    for argv in commands:
        ctx = cli.make_context("ray", argv[1:])
        name, cmd, rest = cli.resolve_command(ctx, argv[1:])
        if isinstance(cmd, click.Group):  # `ray job submit`
            sub_ctx = cmd.make_context(name, rest, parent=ctx)
            name, cmd, rest = cmd.resolve_command(sub_ctx, rest)
            ctx = sub_ctx
        cmd.make_context(name, rest, parent=ctx)  # raises click.UsageError on a wrong usage
        if argv[1] in ("up", "exec", "rsync-up", "down", "submit"):
            assert argv[2] == "ray_cluster.yaml", argv
        if argv[1] == "submit":  # it copies a Python script to the head and runs it: not a command line
            assert [a for a in argv[3:] if a != "--"][0].endswith(".py"), argv
    runs = [c for c in commands if c[1] == "exec" and "pairforge run" in c[3]]
    assert runs and all("--address auto" in c[3] for c in runs)
    assert any(c[1] == "exec" and c[3].startswith("pairforge manifest verify s3://") for c in commands)


def test_the_cluster_job_writes_to_object_storage():
    from pairforge.manifests import storage
    from pairforge.pipeline.config import input_entries, load_job

    job = load_job(ROOT / "pipeline" / "example_cluster_job.yaml")
    assert storage.is_object(storage.path(job.output.dir, job.storage))
    assert all(storage.is_uri(p) for _, src in input_entries(job.input) for p in src.paths)


def test_workers_get_least_privilege_imdsv2_and_token_auth():
    """Issue 29, finding 3: workers had the launcher's default role
    (ray-autoscaler-v1: EC2 and S3 full access) while they fetch untrusted
    URLs; no node required IMDSv2; the head took no token."""
    import json

    cfg = _load()
    types = cfg["available_node_types"]
    for name, node in types.items():
        meta = node["node_config"].get("MetadataOptions")
        assert meta == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}, name
        if name != cfg["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "pairforge-worker"}, name
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no task (no fetched image) on the head, whose role starts instances"
    assert "IamInstanceProfile" not in head["node_config"]  # the launcher's own role, which it needs
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    path = next(o.split("=", 1)[1] for o in cfg["docker"]["run_options"] if o.startswith("--env RAY_AUTH_TOKEN_PATH="))
    assert cfg["file_mounts"][path] == "~/.ray/auth_token"

    policy = json.loads((ROOT / "docs" / "cluster-worker-policy.json").read_text())
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    assert actions <= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    resources = [st["Resource"] for st in policy["Statement"]]
    assert all(r.startswith("arn:aws:s3:::your-bucket") and r != "*" for r in resources)
    writes = [st for st in policy["Statement"] if "s3:PutObject" in st["Action"]]
    assert [st["Resource"] for st in writes] == ["arn:aws:s3:::your-bucket/runs/*"]  # OUT only
    from pairforge.pipeline.config import input_entries, load_job

    job = load_job(ROOT / "pipeline" / "example_cluster_job.yaml")
    assert job.output.dir.startswith("s3://your-bucket/runs/")
    assert all(p.startswith("s3://your-bucket/url-lists/") for _, src in input_entries(job.input) for p in src.paths)
