"""ray_cluster.yaml is a launcher config Ray accepts, and its commands match this checkout."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((PROJECT / "ray_cluster.yaml").read_text())


def test_ray_validates_the_cluster_config(config):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a schema error
    # broken after prepare_config (which would itself fail on it, with a TypeError): the schema must catch it
    broken = prepare_config(copy.deepcopy(config)) | {"max_workers": "two"}
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validate_config(broken)


def test_every_node_is_set_up_the_readme_way_and_starts_ray_with_the_shared_token(config):
    assert any("make setup" in c for c in config["setup_commands"])
    assert "setup:" in (PROJECT / "Makefile").read_text()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=$HOME/.invgan_ray_token" in start
        assert "ray start" in start and "RAY_worker_niceness=0" in start
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head
    port = re.search(r"--port (\d+)", head).group(1)
    assert f"127.0.0.1:{port}" in head
    assert config["file_mounts"]["~/.invgan_ray_token"] == "~/.invgan_ray_token"
    assert ".venv" in config["rsync_exclude"] and "runs" in config["rsync_exclude"]
