"""ray_cluster.yaml is a config `ray up` accepts: checked against Ray's own
schema (ray/autoscaler/ray-schema.json) through Ray's own loader."""

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def _load():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_passes_rays_schema():
    cfg = prepare_config(_load())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(types)
    assert any("pip install -e" in c for c in cfg["setup_commands"]), "the project must be installed on every node"


def test_a_broken_config_is_refused_by_the_same_check():
    bad = copy.deepcopy(_load())
    bad["available_node_types"]["gpu_worker"]["max_workerz"] = 3
    with pytest.raises(ValidationError, match="max_workerz"):
        validate_config(prepare_config(bad))
